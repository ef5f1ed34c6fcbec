// Package tig stands in for nerdctl's test module package of the same name,
// which the module proxy does not serve. nerdctl's binary links a test helper
// that names tig.T, so only that interface is needed; *testing.T satisfies it.
package tig

// T is the part of a test's *testing.T that nerdctl's helpers use.
type T interface {
	Helper()
	Log(args ...any)
	FailNow()
}
