package hbone

// Sink takes bytes without ever blocking: a socket written by the goroutine
// that received the bytes (a tunnel connection's reader), so a relay's
// goroutine need not be woken for each message.
type Sink interface {
	// TryWrite writes a prefix of p without blocking and returns its length
	// (less than len(p) when the socket's buffer is full). An error means
	// the sink is broken; nothing of p was written then.
	TryWrite(p []byte) (int, error)
}

// Pusher is a stream that can write the bytes it receives straight into a
// Sink while its reader is idle (nothing queued, no copy in progress),
// instead of queueing them and waking the reader. What the sink does not
// take at once is queued for Read as usual, in order.
type Pusher interface {
	// PushTo starts pushing into s (nil stops). After PushTo(nil) returns,
	// nothing is pushed any more and the returned count is the bytes pushed
	// since the first PushTo.
	PushTo(s Sink) (pushed int64)
}

// pushInto makes src push into dst when src can push and dst is a socket;
// stop ends it and returns the bytes pushed. Otherwise stop is nil.
func pushInto(dst, src any) (stop func() int64) {
	p, ok := src.(Pusher)
	if !ok {
		return nil
	}
	s := sinkFor(dst)
	if s == nil {
		return nil
	}
	p.PushTo(s)
	return func() int64 { return p.PushTo(nil) }
}
