package netns

import (
	"fmt"
	"net/netip"
	"testing"
)

// Cluster is a Kubernetes-shaped topology: an underlay namespace with bridge
// "br0" (172.30.0.0/24, fd00:30::/64) joins node namespaces; each node has a
// bridge "cni0" holding its pod range (10.244.<i>.0/24, fd00:244:<i>::/64)
// and routes to every other node's pod range, like a flat pod network.
//
//	underlay(br0) ── node1(eth0, cni0) ── pod(eth0)
//	             └── node2(eth0, cni0) ── pod(eth0)
type Cluster struct {
	*Lab
	Underlay  *NS
	Nodes     []*Node
	externals int
}

// Node is a node namespace.
type Node struct {
	*NS
	Cluster  *Cluster
	Index    int
	IP       netip.Addr // underlay IPv4
	IP6      netip.Addr // underlay IPv6
	PodCIDR  netip.Prefix
	PodCIDR6 netip.Prefix
	Gateway  netip.Addr // cni0 IPv4 (the pods' default gateway)
	Gateway6 netip.Addr
	Pods     []*Pod
}

// Pod is a pod namespace attached to its node's cni0 bridge as eth0.
type Pod struct {
	*NS
	Node *Node
	IP   netip.Addr
	IP6  netip.Addr
	// Port is the node side of the pod's veth pair, a port of cni0.
	Port string
}

// NewCluster creates a lab with an empty underlay.
func NewCluster(t testing.TB) *Cluster {
	t.Helper()
	c := &Cluster{Lab: New(t)}
	c.Underlay = c.NewNS("underlay")
	c.Underlay.Bridge("br0", "")
	return c
}

// AddNode adds a node namespace and routes it to every existing node.
func (c *Cluster) AddNode(name string) *Node {
	c.t.Helper()
	i := len(c.Nodes) + 1
	n := &Node{
		NS:       c.NewNS(name),
		Cluster:  c,
		Index:    i,
		IP:       netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 10+i)),
		IP6:      netip.MustParseAddr(fmt.Sprintf("fd00:30::%x", 0x10+i)),
		PodCIDR:  c.mustPrefix(fmt.Sprintf("10.244.%d.0/24", i)),
		PodCIDR6: c.mustPrefix(fmt.Sprintf("fd00:244:%x::/64", i)),
		Gateway:  netip.MustParseAddr(fmt.Sprintf("10.244.%d.1", i)),
		Gateway6: netip.MustParseAddr(fmt.Sprintf("fd00:244:%x::1", i)),
	}
	port := c.ifName("n")
	c.Veth(c.Underlay, port, n.NS, "eth0")
	c.Underlay.Enslave(port, "br0")
	n.AddAddr("eth0", n.IP.String()+"/24")
	n.AddAddr("eth0", n.IP6.String()+"/64")
	n.Sysctl("net.ipv4.ip_forward", "1")
	n.Sysctl("net.ipv6.conf.all.forwarding", "1")
	n.Bridge("cni0", "")
	n.AddAddr("cni0", n.Gateway.String()+"/24")
	n.AddAddr("cni0", n.Gateway6.String()+"/64")
	for _, other := range c.Nodes {
		n.Route(other.PodCIDR.String(), "via", other.IP.String())
		n.Route(other.PodCIDR6.String(), "via", other.IP6.String())
		other.Route(n.PodCIDR.String(), "via", n.IP.String())
		other.Route(n.PodCIDR6.String(), "via", n.IP6.String())
	}
	c.Nodes = append(c.Nodes, n)
	return n
}

// AddPod adds a pod namespace on the node, with addresses from the node's
// pod ranges and default routes via cni0.
func (n *Node) AddPod(name string) *Pod {
	c := n.Cluster
	c.t.Helper()
	k := len(n.Pods) + 10
	p := &Pod{
		NS:   c.NewNS(name),
		Node: n,
		IP:   netip.MustParseAddr(fmt.Sprintf("10.244.%d.%d", n.Index, k)),
		IP6:  netip.MustParseAddr(fmt.Sprintf("fd00:244:%x::%x", n.Index, k)),
	}
	port := c.ifName("vp")
	p.Port = port
	c.Veth(n.NS, port, p.NS, "eth0")
	n.Enslave(port, "cni0")
	p.AddAddr("eth0", p.IP.String()+"/24")
	p.AddAddr("eth0", p.IP6.String()+"/64")
	p.Route("default", "via", n.Gateway.String())
	p.MustIP("-6", "route", "replace", "default", "via", n.Gateway6.String())
	n.Pods = append(n.Pods, p)
	return p
}

// External is a host outside the cluster (a VM, an external service) on
// the underlay network: it reaches nodes directly and pods through their
// node, as a router that knows the pod ranges would send it.
type External struct {
	*NS
	IP netip.Addr
}

// AddExternal adds a namespace on the underlay (172.30.0.200 and up) with
// routes to every current node's pod range. Add it after the nodes.
func (c *Cluster) AddExternal(name string) *External {
	c.t.Helper()
	c.externals++
	e := &External{NS: c.NewNS(name), IP: netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 199+c.externals))}
	port := c.ifName("x")
	c.Veth(c.Underlay, port, e.NS, "eth0")
	c.Underlay.Enslave(port, "br0")
	e.AddAddr("eth0", e.IP.String()+"/24")
	for _, n := range c.Nodes {
		e.Route(n.PodCIDR.String(), "via", n.IP.String())
	}
	return e
}
