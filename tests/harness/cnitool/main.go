// cnitool: a small test-harness clone of the upstream containernetworking/cni
// "cnitool" command, built against the libcni found in the Debian package
// golang-github-appc-cni-dev (GOPATH mode, /usr/share/gocode).
//
// Usage:
//
//	cnitool add   NETNAME NETNS-PATH
//	cnitool check NETNAME NETNS-PATH
//	cnitool del   NETNAME NETNS-PATH
//
// Environment (same names and meaning as upstream cnitool):
//
//	NETCONFPATH   directory holding *.conflist / *.conf / *.json (default /etc/cni/net.d)
//	CNI_PATH      colon-separated list of plugin directories
//	CNI_ARGS      "K=V;K2=V2", handed to the plugins as CNI_ARGS
//	CAP_ARGS      JSON object of capability args, e.g. {"portMappings":[...]}
//	CNI_IFNAME    interface name inside the netns (default eth0 when unset)
//
// Extensions for the test suite (not in upstream):
//
//	CNI_CONTAINERID  use this container ID instead of the netns-path hash
//	CNI_CACHE_DIR    libcni cache directory (default: libcni's /var/lib/cni)
//
// The "gc" and "status" verbs of newer upstream cnitool are not available:
// libcni 1.1.2 has neither GCNetworkList nor GetStatusNetworkList.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

const (
	defaultConfDir = "/etc/cni/net.d"
	defaultIfName  = "eth0"
)

func progName() string {
	return filepath.Base(os.Args[0])
}

func printUsage() {
	p := progName()
	fmt.Fprintf(os.Stderr, "%s: add, check or delete a network attachment in a network namespace\n", p)
	fmt.Fprintf(os.Stderr, "  %s add   <net> <netns>\n", p)
	fmt.Fprintf(os.Stderr, "  %s check <net> <netns>\n", p)
	fmt.Fprintf(os.Stderr, "  %s del   <net> <netns>\n", p)
	fmt.Fprintf(os.Stderr, "env: NETCONFPATH CNI_PATH CNI_ARGS CAP_ARGS CNI_IFNAME CNI_CONTAINERID CNI_CACHE_DIR\n")
}

// finish prints err (if any) on stderr and exits 1, otherwise exits 0.
func finish(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err.Error())
		os.Exit(1)
	}
	os.Exit(0)
}

// splitCNIArgs turns "A=1;B=2" into [][2]string{{"A","1"},{"B","2"}}.
// Like upstream, every item must be exactly KEY=VALUE with both parts
// non-empty (so an empty item, e.g. from a trailing ';', is rejected, and
// so is a value containing '=').
func splitCNIArgs(s string) ([][2]string, error) {
	var out [][2]string
	for _, item := range strings.Split(s, ";") {
		parts := strings.Split(item, "=")
		if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", item)
		}
		out = append(out, [2]string{parts[0], parts[1]})
	}
	return out, nil
}

// containerIDFor mirrors upstream: "cnitool-" + hex of the first 10 bytes
// of sha512(absolute netns path).
func containerIDFor(netnsPath string) string {
	sum := sha512.Sum512([]byte(netnsPath))
	return "cnitool-" + hex.EncodeToString(sum[:10])
}

func main() {
	if len(os.Args) < 2 {
		printUsage()
		os.Exit(1)
	}
	cmd := os.Args[1]
	switch cmd {
	case "add", "check", "del":
	case "gc", "status":
		finish(fmt.Errorf("%s: command %q is not supported: libcni 1.1.2 (golang-github-appc-cni-dev) has no GCNetworkList/GetStatusNetworkList", progName(), cmd))
	default:
		printUsage()
		os.Exit(1)
	}
	if len(os.Args) < 4 {
		printUsage()
		os.Exit(1)
	}
	netName := os.Args[2]

	confDir := os.Getenv("NETCONFPATH")
	if confDir == "" {
		confDir = defaultConfDir
	}
	confList, err := libcni.LoadConfList(confDir, netName)
	if err != nil {
		finish(err)
	}

	var capArgs map[string]interface{}
	if v := os.Getenv("CAP_ARGS"); v != "" {
		if err := json.Unmarshal([]byte(v), &capArgs); err != nil {
			finish(err)
		}
	}

	var cniArgs [][2]string
	if v := os.Getenv("CNI_ARGS"); v != "" {
		if cniArgs, err = splitCNIArgs(v); err != nil {
			finish(err)
		}
	}

	// Upstream only defaults when the variable is unset; an empty value is
	// passed through (libcni then rejects it on ADD).
	ifName, set := os.LookupEnv("CNI_IFNAME")
	if !set {
		ifName = defaultIfName
	}

	netnsPath, err := filepath.Abs(os.Args[3])
	if err != nil {
		finish(err)
	}

	containerID := os.Getenv("CNI_CONTAINERID")
	if containerID == "" {
		containerID = containerIDFor(netnsPath)
	}

	// An empty cache dir makes libcni fall back to libcni.CacheDir (/var/lib/cni).
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)

	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netnsPath,
		IfName:         ifName,
		Args:           cniArgs,
		CapabilityArgs: capArgs,
	}

	ctx := context.Background()
	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, confList, rt)
		if res != nil {
			if perr := res.Print(); perr != nil && err == nil {
				err = perr
			}
		}
		finish(err)
	case "check":
		finish(cni.CheckNetworkList(ctx, confList, rt))
	case "del":
		finish(cni.DelNetworkList(ctx, confList, rt))
	}
}
