"""cni-bridge: a CNI main plugin attaching containers to a Linux bridge.

Keep this module empty of imports: the exec'd plugin's start-up time matters.
"""
