//go:build tools

// Package tools records the one program this module builds, so `go mod tidy` keeps its dependencies.
package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
