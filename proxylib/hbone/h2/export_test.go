package h2

// SetRecordBatching switches TLS record batching (batchconn.go) for
// same-run benchmark comparisons; it returns the previous setting.
func SetRecordBatching(on bool) bool {
	prev := batchRecords
	batchRecords = on
	return prev
}

// Pushed reports the bytes a tunnel pushed into its sink (hbone.LazyPusher).
func Pushed(s any) int64 {
	t := s.(*tunnel)
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pushed
}
