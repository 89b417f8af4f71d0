package controllers

import (
	"fmt"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// meshStatus is the status being computed during one reconcile. Conditions
// start from the stored ones so unchanged conditions keep their transition
// times and an unchanged status compares equal.
type meshStatus struct {
	generation int64
	status     meshv1.AmbientMeshStatus
}

func newMeshStatus(mesh *meshv1.AmbientMesh) *meshStatus {
	st := &meshStatus{generation: mesh.Generation, status: *mesh.Status.DeepCopy()}
	st.status.ObservedGeneration = mesh.Generation
	return st
}

func (s *meshStatus) set(condType string, ok bool, reason, msg string) {
	status := metav1.ConditionFalse
	if ok {
		status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&s.status.Conditions, metav1.Condition{
		Type: condType, Status: status, Reason: reason, Message: msg, ObservedGeneration: s.generation,
	})
}

func (s *meshStatus) isTrue(condType string) bool {
	return meta.IsStatusConditionTrue(s.status.Conditions, condType)
}

// rootRotation reports a root rotation's phase; nothing before the first.
func (s *meshStatus) rootRotation(r rotation) {
	if r.Phase == "" {
		return
	}
	msg := r.Wait
	if msg == "" {
		switch r.Phase {
		case meshv1.ReasonCompleted:
			msg = "the old root was removed from the trust bundle; every certificate chains to the new root"
		default:
			msg = "root rotation " + r.Phase
		}
	}
	s.set(meshv1.ConditionRootRotation, true, r.Phase, msg)
}

func daemonSetRollout(ds *appsv1.DaemonSet) meshv1.RolloutStatus {
	return meshv1.RolloutStatus{Desired: ds.Status.DesiredNumberScheduled, Ready: ds.Status.NumberReady}
}

// daemonSetReady: the DaemonSet controller has seen the current spec and every
// scheduled pod runs it and is ready.
func daemonSetReady(ds *appsv1.DaemonSet) bool {
	s := ds.Status
	return ds.Generation > 0 && s.ObservedGeneration >= ds.Generation &&
		s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled
}

func (s *meshStatus) daemonSet(condType, what string, ds *appsv1.DaemonSet) {
	st := ds.Status
	if daemonSetReady(ds) {
		s.set(condType, true, meshv1.ReasonDaemonSetReady, fmt.Sprintf("%s ready on %d/%d nodes", what, st.NumberReady, st.DesiredNumberScheduled))
		return
	}
	msg := fmt.Sprintf("%s ready on %d/%d nodes (%d updated)", what, st.NumberReady, st.DesiredNumberScheduled, st.UpdatedNumberScheduled)
	if st.ObservedGeneration < ds.Generation {
		msg = fmt.Sprintf("%s rollout of generation %d not yet observed by the DaemonSet controller", what, ds.Generation)
	}
	s.set(condType, false, meshv1.ReasonDaemonSetNotReady, msg)
}

// inboundCapture reports the mode the node agents were given. TPROXY on
// the iptables backend is not silently turned into NAT: the node agents
// get what was asked, refuse to capture with it (fail closed), and the
// condition says why.
func (s *meshStatus) inboundCapture(mesh *meshv1.AmbientMesh) {
	mode := inboundMode(mesh)
	if mode == meshv1.InboundTPROXY && mesh.Spec.Capture.Redirection == meshv1.RedirectionIPTables {
		s.set(meshv1.ConditionInboundCapture, false, meshv1.ReasonTPROXYNeedsNFTables,
			"spec.capture.inboundMode TPROXY needs spec.capture.redirection nftables: the node agents refuse to capture pods (new pods in ambient namespaces do not start; captured pods keep their rules) until one of the two is changed")
		return
	}
	msg := "inbound TCP reaches ztunnel by NAT REDIRECT: apps see mesh clients' addresses, their own for plaintext clients outside the mesh"
	if mode == meshv1.InboundTPROXY {
		msg = "inbound TCP reaches ztunnel by TPROXY: apps see every client's own address"
	}
	s.set(meshv1.ConditionInboundCapture, true, string(mode), msg)
}

// summarize derives Ready from the other conditions, naming the first
// specific reason it is not.
func (s *meshStatus) summarize() {
	s.status.ReadySummary = fmt.Sprintf("%d/%d", s.status.Ztunnel.Ready, s.status.Ztunnel.Desired)
	for _, t := range []string{meshv1.ConditionReconciled, meshv1.ConditionCAReady, meshv1.ConditionInboundCapture} {
		if c := meta.FindStatusCondition(s.status.Conditions, t); c != nil && c.Status != metav1.ConditionTrue {
			s.set(meshv1.ConditionReady, false, c.Reason, c.Message)
			return
		}
	}
	var waiting []string
	for _, t := range []string{meshv1.ConditionZtunnelReady, meshv1.ConditionNodeAgentReady} {
		c := meta.FindStatusCondition(s.status.Conditions, t)
		if c == nil || c.Status != metav1.ConditionTrue {
			msg := t + " unknown"
			if c != nil {
				msg = c.Message
			}
			waiting = append(waiting, msg)
		}
	}
	if len(waiting) > 0 {
		s.set(meshv1.ConditionReady, false, meshv1.ReasonComponentsNotReady, strings.Join(waiting, "; "))
		return
	}
	s.set(meshv1.ConditionReady, true, meshv1.ReasonAllComponentsReady, "ztunnel, node agent and CA are ready")
}
