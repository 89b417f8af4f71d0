// Package adminapi is the JSON document a proxy serves on :15000/config_dump
// (the "Admin API" section of docs/interfaces.md). The proxies' admin server
// writes it and ambientctl reads it; it has no dependencies so the CLI stays small.
package adminapi

// Workload is one entry of workloads[].
type Workload struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	UID       string   `json:"uid"`
	Addresses []string `json:"addresses"`
	// Hostname is set for workloads known by name only (ServiceEntry DNS
	// endpoints, WorkloadEntries with a hostname address).
	Hostname       string `json:"hostname,omitempty"`
	Node           string `json:"node"`
	ServiceAccount string `json:"serviceAccount"`
	Waypoint       string `json:"waypoint"`
	Protocol       string `json:"protocol"`
	Status         string `json:"status"`
}

// Service is one entry of services[].
type Service struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Hostname  string            `json:"hostname"`
	Addresses []string          `json:"addresses"`
	Ports     map[string]uint32 `json:"ports"`
	Endpoints int               `json:"endpoints"`
	Waypoint  string            `json:"waypoint"`
}

// Policy is one entry of policies[].
type Policy struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Action    string `json:"action"`
	Scope     string `json:"scope"`
}

// Certificate is one entry of certificates[].
type Certificate struct {
	Identity  string `json:"identity"`
	Type      string `json:"type"`  // "Cert Chain" | "CA"
	State     string `json:"state"` // "Available" | "Pending" | "Unavailable"
	Valid     bool   `json:"valid"`
	Serial    string `json:"serial"`
	NotBefore string `json:"notBefore,omitempty"`
	NotAfter  string `json:"notAfter,omitempty"`
}

// DNS is the dns section: ztunnel's DNS proxy (absent on proxies
// without one).
type DNS struct {
	ClusterDomain string `json:"clusterDomain"`
	// DefaultUpstreams serve pods whose own resolvers are unknown.
	DefaultUpstreams []string `json:"defaultUpstreams"`
	CacheEntries     int      `json:"cacheEntries"`
	// Pods are the pods the proxy serves and whether their DNS is captured.
	Pods []DNSPod `json:"pods"`
}

// DNSPod is one entry of dns.pods[].
type DNSPod struct {
	Name        string   `json:"name"`
	Namespace   string   `json:"namespace"`
	UID         string   `json:"uid"`
	Captured    bool     `json:"captured"`
	Nameservers []string `json:"nameservers"`
}

// ConfigDump is the /config_dump document.
type ConfigDump struct {
	Workloads    []Workload    `json:"workloads"`
	Services     []Service     `json:"services"`
	Policies     []Policy      `json:"policies"`
	Certificates []Certificate `json:"certificates"`
	DNS          *DNS          `json:"dns,omitempty"`
}
