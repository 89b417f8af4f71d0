package handover

import (
	"errors"
	"strings"
	"testing"
)

var testID = ID{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10}

const testIDHex = "0123456789abcdeffedcba9876543210"

func TestHeaderRoundTrip(t *testing.T) {
	p := Params{ID: testID, Epoch: 2, Sent: 12345, Recv: 9223372036854775807}
	if got := FormatAnswer(testID); got != "v1;id="+testIDHex {
		t.Fatalf("FormatAnswer = %q", got)
	}
	if id, err := ParseAnswer(FormatAnswer(testID)); err != nil || id != testID {
		t.Fatalf("ParseAnswer = %v, %v", id, err)
	}
	s := FormatSuspend(p)
	if s != "v1;id="+testIDHex+";epoch=2;sent=12345" {
		t.Fatalf("FormatSuspend = %q", s)
	}
	got, err := ParseSuspend(s)
	if err != nil || got != (Params{ID: testID, Epoch: 2, Sent: 12345}) {
		t.Fatalf("ParseSuspend = %+v, %v", got, err)
	}
	r := FormatResume(p)
	if got, err := ParseResume(r); err != nil || got != p {
		t.Fatalf("ParseResume(%q) = %+v, %v", r, got, err)
	}
}

func TestHeaderParseRefuses(t *testing.T) {
	good := "v1;id=" + testIDHex + ";epoch=0;sent=1;recv=2"
	if _, err := ParseResume(good); err != nil {
		t.Fatalf("good resume refused: %v", err)
	}
	for _, v := range []string{
		"",
		"v1",
		"v2;id=" + testIDHex + ";epoch=0;sent=1;recv=2",                  // unknown version
		"V1;id=" + testIDHex + ";epoch=0;sent=1;recv=2",                  // case
		"v1;id=" + strings.ToUpper(testIDHex) + ";epoch=0;sent=1;recv=2", // one spelling only
		"v1;id=" + testIDHex[:31] + ";epoch=0;sent=1;recv=2",             // short id
		"v1;id=" + testIDHex + "00;epoch=0;sent=1;recv=2",                // long id
		"v1;id=0123456789abcdeffedcba987654321g;epoch=0;sent=1;recv=2",
		"v1;id=00000000000000000000000000000000;epoch=0;sent=1;recv=2",    // zero id
		"v1;epoch=0;id=" + testIDHex + ";sent=1;recv=2",                   // order
		"v1;id=" + testIDHex + ";epoch=0;sent=1",                          // missing recv
		"v1;id=" + testIDHex + ";epoch=0;sent=1;recv=2;x=1",               // extra
		"v1;id=" + testIDHex + ";epoch=0;sent=-1;recv=2",                  // negative
		"v1;id=" + testIDHex + ";epoch=0;sent=+1;recv=2",                  // sign
		"v1;id=" + testIDHex + ";epoch=0;sent=01;recv=2",                  // leading zero
		"v1;id=" + testIDHex + ";epoch=0;sent=9223372036854775808;recv=2", // overflow
		"v1;id=" + testIDHex + ";epoch=0;sent=;recv=2",
		"v1;id=" + testIDHex + ";epoch=0;sent=1 ;recv=2",
		"v1;id=" + testIDHex + ";epoch=0;sent=1;recv",
		"v1;id=" + testIDHex + ";epoch=0;sent=1;recv=2" + strings.Repeat(" ", 300),
	} {
		if _, err := ParseResume(v); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseResume(%q) = %v, want ErrMalformed", v, err)
		}
	}
	// A suspend is not a resume, nor the reverse.
	if _, err := ParseSuspend(good); !errors.Is(err, ErrMalformed) {
		t.Errorf("resume value parsed as a suspend: %v", err)
	}
	if _, err := ParseAnswer("v1"); !errors.Is(err, ErrMalformed) {
		t.Errorf("an offer parsed as an answer: %v", err)
	}
}

func TestNewIDIsRandom(t *testing.T) {
	a, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewID()
	if a == b || a.IsZero() {
		t.Fatalf("ids %s and %s", a, b)
	}
	if got, err := ParseID(a.String()); err != nil || got != a {
		t.Fatalf("ParseID(%s) = %s, %v", a, got, err)
	}
}
