package h2

// SetRecordBatching switches TLS record batching (batchconn.go) for
// same-run benchmark comparisons; it returns the previous setting.
func SetRecordBatching(on bool) bool {
	prev := batchRecords
	batchRecords = on
	return prev
}
