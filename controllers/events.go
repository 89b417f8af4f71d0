package controllers

import (
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// EventSource names the operator in the Events it records.
const EventSource = "ambient-operator"

// Event reasons of the operator. Mesh events are recorded on the
// AmbientMesh, waypoint events on the Gateway or WaypointPolicy. Each is recorded when the
// state changes (from the stored status conditions, so a restarted
// operator does not repeat them), never on every reconcile.
const (
	EventCAIssued               = "CAIssued"
	EventCARotated              = "CARotated"
	EventCAInvalid              = "CAInvalid"
	EventCAValid                = "CAValid"
	EventRootRotation           = "RootRotation"
	EventRootRotationFailed     = "RootRotationFailed"
	EventZtunnelRolloutStarted  = "ZtunnelRolloutStarted"
	EventZtunnelRolloutFinished = "ZtunnelRolloutFinished"
	EventWaypointReady          = "WaypointReady"
	EventWaypointNotReady       = "WaypointNotReady"
)

// recordCA reports what the CA reconcile did: a new root, or a new
// intermediate under the same root.
func recordCA(ev *kubeevents.Recorder, mesh *meshv1.AmbientMesh, m *meshCA) {
	until := m.Authority.Cert.NotAfter.UTC().Format(time.RFC3339)
	switch {
	case m.Issued:
		ev.Emit(mesh, kubeevents.Event{Type: kubeevents.Normal, Reason: EventCAIssued, Action: "IssueCA",
			Note: fmt.Sprintf("issued a self-signed mesh root for %s in Secret %s/%s; signing intermediate valid until %s", mesh.Spec.TrustDomain, mesh.Spec.Namespace, CASecretName, until)})
	case m.Root.Entered:
		ev.Emit(mesh, kubeevents.Event{Type: kubeevents.Normal, Reason: EventRootRotation, Action: "Rotate" + m.Root.Phase,
			Note: fmt.Sprintf("root rotation: %s; %s", m.Root.Phase, rotationNote(m.Root))})
	case m.Rotated:
		ev.Emit(mesh, kubeevents.Event{Type: kubeevents.Normal, Reason: EventCARotated, Action: "RotateCA",
			Note: fmt.Sprintf("re-issued the signing intermediate under the same root; valid until %s", until)})
	}
}

func rotationNote(r rotation) string {
	switch r.Phase {
	case meshv1.ReasonOverlapping:
		return "the trust bundle carries the old and the new root"
	case meshv1.ReasonReissuing:
		return "the new chain signs; the old root stays until " + r.OldChainUntil.UTC().Format(time.RFC3339)
	}
	return "the old root was removed from the trust bundle"
}

// conditionChange is a condition's state as a kubeevents.Change: the
// state is the status (and, withReason, the reason), assumed from the
// stored status when the process remembers nothing (after a restart; the
// cache may lag the operator's own writes, which the in-memory state does
// not), or from assume when the condition is new. The event is ifTrue or
// ifFalse by the new status; nil for no event.
func conditionChange(before, after []metav1.Condition, condType, assume string, withReason bool, ifTrue, ifFalse *kubeevents.Event) (kubeevents.Change, bool) {
	now := meta.FindStatusCondition(after, condType)
	if now == nil {
		return kubeevents.Change{}, false
	}
	state := func(c *metav1.Condition) string {
		if withReason && c.Status != metav1.ConditionTrue {
			return string(c.Status) + "/" + c.Reason
		}
		return string(c.Status)
	}
	ch := kubeevents.Change{Topic: condType, Assume: assume, State: state(now)}
	if was := meta.FindStatusCondition(before, condType); was != nil {
		ch.Assume = state(was)
	}
	ev := ifFalse
	if now.Status == metav1.ConditionTrue {
		ev = ifTrue
	}
	if ev != nil {
		ch.Event = *ev
		ch.Note = now.Message
	}
	return ch, true
}

// recordMeshTransitions reports CA validity and ztunnel rollouts from the
// mesh's conditions before and after a reconcile whose status was written.
func recordMeshTransitions(ev *kubeevents.Recorder, mesh *meshv1.AmbientMesh, before, after []metav1.Condition) {
	// A new mesh is assumed to have a valid CA: issuance has its own event.
	if ch, ok := conditionChange(before, after, meshv1.ConditionCAReady, string(metav1.ConditionTrue), true,
		&kubeevents.Event{Type: kubeevents.Normal, Reason: EventCAValid, Action: "ValidateCA"},
		&kubeevents.Event{Type: kubeevents.Warning, Reason: EventCAInvalid, Action: "ValidateCA"}); ok {
		ev.Transition(mesh, ch)
	}
	// Rotation phases have their own events (recordCA); a stopped rotation warns.
	if ch, ok := conditionChange(before, after, meshv1.ConditionRootRotation, string(metav1.ConditionTrue), true, nil,
		&kubeevents.Event{Type: kubeevents.Warning, Reason: EventRootRotationFailed, Action: "RotateRoot"}); ok {
		ev.Transition(mesh, ch)
	}
	if ch, ok := conditionChange(before, after, meshv1.ConditionZtunnelReady, "", false,
		&kubeevents.Event{Type: kubeevents.Normal, Reason: EventZtunnelRolloutFinished, Action: "RolloutZtunnel"},
		&kubeevents.Event{Type: kubeevents.Normal, Reason: EventZtunnelRolloutStarted, Action: "RolloutZtunnel"}); ok {
		ev.Transition(mesh, ch)
	}
}

// recordWaypointReady reports a waypoint (a Gateway's Programmed, a
// WaypointPolicy's WaypointReady condition) becoming ready, or unready
// after having been ready; a new waypoint is assumed unready.
func recordWaypointReady(ev *kubeevents.Recorder, obj client.Object, before, after []metav1.Condition, condType string) {
	if ch, ok := conditionChange(before, after, condType, string(metav1.ConditionFalse), false,
		&kubeevents.Event{Type: kubeevents.Normal, Reason: EventWaypointReady, Action: "Deploy"},
		&kubeevents.Event{Type: kubeevents.Warning, Reason: EventWaypointNotReady, Action: "Deploy"}); ok {
		ch.Note = "waypoint: " + ch.Note
		ev.Transition(obj, ch)
	}
}
