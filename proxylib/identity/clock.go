package identity

import "time"

// Clock is the time source of certificate rotation, injectable so tests can
// move time by a day without waiting for it.
type Clock interface {
	Now() time.Time
	// After behaves as time.After.
	After(d time.Duration) <-chan time.Time
}

// RealClock is the wall clock.
type RealClock struct{}

func (RealClock) Now() time.Time                         { return time.Now() }
func (RealClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
