// cni-bridge front end: a static executable that hands a CNI call to the node daemon.
//
// A CNI runtime execs the plugin once per call. The Python front end spends
// ~13 ms of wall time and ~20 ms of CPU just starting an interpreter before it
// can forward the call; this program does the same forwarding in ~1-2 ms. It
// speaks the daemon's wire protocol (cni_bridge/daemon_client.py is the
// reference; keep the two in step) and does nothing else:
//
//   - the call is answered by the daemon: print its stdout and stderr, exit
//     with its status;
//   - no daemon (no socket, not owned by root, refused, or its worker died
//     with the call): exec the Python implementation next to this file,
//     cni-bridge-python, with the same arguments, environment and stdin, plus
//     CNI_BRIDGE_FRONT_END telling it what happened so it neither asks the
//     daemon again nor forgets to clean up after a lost ADD;
//   - no answer in time: the daemon may still be running the call, so never
//     redo it; hang up (the daemon then stops or undoes it) and answer CNI
//     error 11 so that the runtime retries;
//   - not a CNI call (CNI_COMMAND unset: usage text, `agent`, `daemon`): exec
//     the Python implementation at once.
//
// Standard library only, so Debian's golang-go builds it with nothing downloaded.
package main

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

const (
	protocolVersion  = 1
	configKey        = "daemonSocket"
	defaultSocket    = "/run/cni-bridge/daemon.sock"
	envPrefix        = "CNI_"
	maxRequestBytes  = 1 << 20
	maxResponseBytes = 16 << 20
	connectTimeout   = 10 * time.Second
	refusalTimeout   = 500 * time.Millisecond
	// FrontEndEnv tells the Python implementation why it runs in-process.
	frontEndEnv = "CNI_BRIDGE_FRONT_END"
)

// Set at build time (-ldflags "-X main.fallbackPath=...") to pin the Python
// implementation; empty means cni-bridge-python in this executable's folder.
var fallbackPath = ""

// How long to wait for the daemon's answer (daemon_client.ANSWER_TIMEOUT):
// below kubelet's 120 s runtime-request-timeout, above the daemon's own hard
// limit. A variable only so that a test build can shorten it with -X.
var answerTimeout = "100s"

type outcome int

const (
	answered    outcome = iota
	unavailable         // the daemon cannot have run the call
	lost                // the daemon took the call and its worker died without an answer
	timedOut            // no answer in time: the daemon may still be running the call
)

type reply struct {
	V       int     `json:"v"`
	Stdout  *string `json:"stdout"`
	Stderr  string  `json:"stderr"`
	Exit    *int    `json:"exit"`
	Refused *string `json:"refused"`
}

func main() {
	if _, isCall := os.LookupEnv("CNI_COMMAND"); !isCall {
		runPython(nil, "")
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		runPython(nil, "unavailable") // let the Python implementation read what is left and report it
	}
	res, state, reason := forward(stdin)
	if state == answered {
		os.Stderr.WriteString(res.Stderr)
		os.Stdout.WriteString(*res.Stdout)
		os.Exit(*res.Exit)
	}
	if os.Getenv("CNI_BRIDGE_FRONT_END_DEBUG") != "" {
		fmt.Fprintf(os.Stderr, "cni-bridge front end: in-process because %s\n", reason)
	}
	if state == timedOut {
		answerError(stdin, 11, "the cni-bridge daemon gave no answer: "+reason,
			"the daemon stops or undoes a call whose plugin has gone; retry the call")
	}
	if state == lost {
		runPython(stdin, "lost")
	}
	runPython(stdin, "unavailable")
}

// socketPath mirrors daemon_client.socket_path.
func socketPath(stdin []byte) (string, bool) {
	var config map[string]json.RawMessage
	if json.Unmarshal(stdin, &config) != nil || config == nil {
		return "", false
	}
	raw, present := config[configKey]
	if !present || string(raw) == "null" {
		if _, err := os.Stat(defaultSocket); err == nil {
			return defaultSocket, true
		}
		return "", false
	}
	var path string
	if json.Unmarshal(raw, &path) != nil || path == "" {
		return "", false // "" turns the daemon off; a non-string is for validation to report
	}
	return path, true
}

// trustedSocket mirrors daemon_client.trusted_socket: a socket owned by root or by us.
func trustedSocket(path string) bool {
	info, err := os.Stat(path)
	if err != nil || info.Mode()&os.ModeSocket == 0 {
		return false
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	return ok && (st.Uid == 0 || int(st.Uid) == os.Geteuid())
}

// netnsID mirrors daemon_client.netns_id: the daemon serves only its own network namespace.
func netnsID() (string, bool) {
	info, err := os.Stat("/proc/self/ns/net")
	if err != nil {
		return "", false
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return "", false
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), true
}

var errNotUTF8 = errors.New("a CNI_ variable is not valid UTF-8")

func encodeRequest(stdin []byte) ([]byte, error) {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, envPrefix) {
			// JSON would replace the bad bytes: the call must see them as they are.
			if !utf8.ValidString(k) || !utf8.ValidString(v) {
				return nil, errNotUTF8
			}
			env[k] = v
		}
	}
	request := map[string]any{
		"v":     protocolVersion,
		"env":   env,
		"stdin": base64.StdEncoding.EncodeToString(stdin),
	}
	if id, ok := netnsID(); ok {
		request["netns"] = id
	}
	body, err := json.Marshal(request)
	if err != nil {
		return nil, err
	}
	frame := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(frame, uint32(len(body)))
	return append(frame, body...), nil
}

func readFrame(conn net.Conn) ([]byte, error) {
	var size [4]byte
	if _, err := io.ReadFull(conn, size[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(size[:])
	if n > maxResponseBytes {
		return nil, fmt.Errorf("frame of %d bytes exceeds the limit", n)
	}
	body := make([]byte, n)
	_, err := io.ReadFull(conn, body)
	return body, err
}

func decodeReply(body []byte) (*reply, outcome, string) {
	var r reply
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, lost, "the daemon's answer is not a JSON object"
	}
	if r.Refused != nil {
		return nil, unavailable, "refused: " + *r.Refused
	}
	if r.Stdout == nil || r.Exit == nil {
		return nil, lost, "the daemon's answer lacks stdout or exit"
	}
	return &r, answered, ""
}

func forward(stdin []byte) (*reply, outcome, string) {
	path, ok := socketPath(stdin)
	if !ok {
		return nil, unavailable, "no daemon socket configured or present"
	}
	if !trustedSocket(path) {
		return nil, unavailable, path + " is not a socket owned by root"
	}
	frame, err := encodeRequest(stdin)
	if err != nil {
		return nil, unavailable, err.Error()
	}
	if len(frame)-4 > maxRequestBytes {
		return nil, unavailable, "request too large for the daemon"
	}
	conn, err := net.DialTimeout("unix", path, connectTimeout)
	if err != nil {
		return nil, unavailable, "connect: " + err.Error()
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(connectTimeout))
	if _, err := conn.Write(frame); err != nil {
		// Not all of the request arrived, so the daemon cannot have run it; it
		// may have refused us before reading, and that answer is worth reading.
		conn.SetDeadline(time.Now().Add(refusalTimeout))
		if body, rerr := readFrame(conn); rerr == nil {
			if _, state, reason := decodeReply(body); state == unavailable {
				return nil, unavailable, reason
			}
		}
		return nil, unavailable, "send: " + err.Error()
	}
	wait, err := time.ParseDuration(answerTimeout)
	if err != nil {
		wait = 100 * time.Second
	}
	conn.SetDeadline(time.Now().Add(wait))
	body, err := readFrame(conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return nil, timedOut, "no answer within " + wait.String()
	}
	if err != nil {
		return nil, lost, "no answer: " + err.Error()
	}
	return decodeReply(body)
}

func pythonPath() string {
	if fallbackPath != "" {
		return fallbackPath
	}
	// The executable's own path: argv[0] is whatever the caller chose to pass.
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	return filepath.Join(filepath.Dir(self), "cni-bridge-python")
}

// runPython replaces this process with the Python implementation; stdin, when
// given, is what this process already read from its own stdin.
func runPython(stdin []byte, why string) {
	target := pythonPath()
	env := os.Environ()
	if why != "" {
		env = append(env, frontEndEnv+"="+why)
	}
	argv := append([]string{target}, os.Args[1:]...)
	if stdin != nil {
		if err := refeedStdin(stdin); err != nil {
			runChild(target, argv, env, stdin)
		}
	}
	err := syscall.Exec(target, argv, env)
	fail(fmt.Sprintf("cannot run the in-process implementation %s: %v", target, err), stdin)
}

// refeedStdin puts the bytes already read back on fd 0 through a pipe that
// holds them all, so the exec'd program reads exactly what we were given.
func refeedStdin(stdin []byte) error {
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		return err
	}
	r, w := fds[0], fds[1]
	if len(stdin) > 60<<10 {
		const fSetPipeSz = 1031 // F_SETPIPE_SZ
		size, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(w), fSetPipeSz, uintptr(len(stdin)+4096))
		if errno != 0 || int(size) < len(stdin) {
			syscall.Close(r)
			syscall.Close(w)
			return errors.New("stdin is larger than a pipe")
		}
	}
	for off := 0; off < len(stdin); {
		n, err := syscall.Write(w, stdin[off:])
		if err != nil {
			syscall.Close(r)
			syscall.Close(w)
			return err
		}
		off += n
	}
	syscall.Close(w)
	if err := syscall.Dup3(r, 0, 0); err != nil {
		syscall.Close(r)
		return err
	}
	syscall.Close(r)
	return nil
}

// runChild is the slow way for a stdin too large for one pipe: run the Python
// implementation as a child and pass its outcome on.
func runChild(target string, argv, env []string, stdin []byte) {
	cmd := &exec.Cmd{Path: target, Args: argv, Env: env, Stdout: os.Stdout, Stderr: os.Stderr}
	cmd.Stdin = strings.NewReader(string(stdin))
	err := cmd.Run()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		os.Exit(exitErr.ExitCode())
	}
	if err != nil {
		fail(fmt.Sprintf("cannot run the in-process implementation %s: %v", target, err), stdin)
	}
	os.Exit(0)
}

// fail reports a broken installation the way a CNI runtime expects an error.
func fail(msg string, stdin []byte) {
	answerError(stdin, 999, msg, "the cni-bridge front end needs cni-bridge-python beside it")
}

// answerError prints a CNI error object in the config's version and exits 1.
func answerError(stdin []byte, code int, msg, details string) {
	version := "1.0.0"
	var config struct {
		CNIVersion string `json:"cniVersion"`
	}
	if json.Unmarshal(stdin, &config) == nil && config.CNIVersion != "" {
		version = config.CNIVersion
	}
	out, _ := json.Marshal(map[string]any{"cniVersion": version, "code": code, "msg": msg, "details": details})
	os.Stdout.Write(append(out, '\n'))
	os.Exit(1)
}
