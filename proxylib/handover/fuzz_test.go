package handover

import (
	"encoding/json"
	"testing"
)

// FuzzHandoverHeaders: a hostile header never crashes the parsers, and what
// parses formats back to the same value (one spelling per message).
func FuzzHandoverHeaders(f *testing.F) {
	p := Params{ID: testID, Epoch: 3, Sent: 17, Recv: 0}
	for _, s := range []string{FormatAnswer(testID), FormatSuspend(p), FormatResume(p), "v1", "", "v1;id=;", "v1;id=" + testIDHex + ";epoch=00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		if got, err := ParseResume(v); err == nil && FormatResume(got) != v {
			t.Fatalf("resume %q re-formats as %q", v, FormatResume(got))
		}
		if got, err := ParseSuspend(v); err == nil && FormatSuspend(got) != v {
			t.Fatalf("suspend %q re-formats as %q", v, FormatSuspend(got))
		}
		if id, err := ParseAnswer(v); err == nil && FormatAnswer(id) != v {
			t.Fatalf("answer %q re-formats as %q", v, FormatAnswer(id))
		}
	})
}

// FuzzHandoverMessage: the SCM_RIGHTS message parser never crashes, and
// anything it accepts is valid and encodes again.
func FuzzHandoverMessage(f *testing.F) {
	good, _ := json.Marshal(testHandoff())
	f.Add(good)
	f.Add([]byte(`{"v":1}`))
	f.Add([]byte(`{"v":1,"session":"` + testIDHex + `","sent":-1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseHandoff(b)
		if err != nil {
			return
		}
		h := Handoff{V: 1, Session: d.ID.String(), Epoch: d.Epoch, Sent: d.Sent, Recv: d.Recv, Pod: d.Pod,
			Local: d.Local.String(), Peer: d.Peer.String(), Resume: d.Resume.String(), Target: d.Target.String(), Direction: d.Direction}
		if _, err := h.Encode(); err != nil {
			t.Fatalf("accepted %q but its fields do not encode: %v", b, err)
		}
	})
}
