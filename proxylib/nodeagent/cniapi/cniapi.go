// Package cniapi is the small HTTP-over-unix-socket API between the CNI
// plugin (run by the container runtime) and the node agent.
package cniapi

// DefaultSocketPath is where the node agent serves the plugin.
const DefaultSocketPath = "/var/run/ambient/cni.sock"

// Paths of the API.
const (
	PathAdd = "/v1/cni/add"
	PathDel = "/v1/cni/del"
)

// PodEvent describes a sandbox the runtime is creating or deleting.
type PodEvent struct {
	ContainerID  string   `json:"containerID"`
	Netns        string   `json:"netns"` // CNI_NETNS
	PodName      string   `json:"podName"`
	PodNamespace string   `json:"podNamespace"`
	PodUID       string   `json:"podUID,omitempty"` // K8S_POD_UID when the runtime passes it
	IPs          []string `json:"ips,omitempty"`    // from prevResult
	// PluginPID/NetnsFD name the plugin's open handle on the namespace
	// (<host proc>/<pid>/fd/<fd>), valid during the request. The agent uses
	// it when Netns is not visible in its mount namespace (runtimes that
	// keep netns mounts under their own state directory).
	PluginPID int `json:"pluginPID,omitempty"`
	NetnsFD   int `json:"netnsFD,omitempty"`
}

// AddResponse says whether the pod was captured (errors are HTTP status >= 400
// with the reason as body).
type AddResponse struct {
	Captured bool   `json:"captured"`
	Reason   string `json:"reason"`
}
