"""The CNI protocol, shared by both executables: env, versions, results, errors.

Standard library only, so that VERSION and IPAM paths stay cheap to start.
"""
