package h2

// SetRecordBatching switches TLS record batching (batchconn.go) for
// same-run benchmark comparisons; it returns the previous setting.
func SetRecordBatching(on bool) bool {
	prev := batchRecords
	batchRecords = on
	return prev
}

// SetFrameHolding switches the dialer's frame holding (bodyPipe hints to
// the recordBatcher) for same-run comparisons; it returns the previous value.
func SetFrameHolding(on bool) bool {
	prev := holdFrames
	holdFrames = on
	return prev
}
