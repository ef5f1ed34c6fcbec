package layer

import "sync/atomic"

// fsOps counts the file system operations this package makes: every call
// on a name (each goes through checkName) and every entry a directory
// listing returns. Tests bound the cost of an input by it, a count that a
// loaded machine cannot change, where a clock would flake.
var fsOps atomic.Int64

// countOps adds n operations.
func countOps(n int) { fsOps.Add(int64(n)) }
