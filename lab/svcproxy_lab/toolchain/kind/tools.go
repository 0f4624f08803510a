//go:build tools

// Package tools pins the kind command and the CoreDNS server built for the kind cluster.
package tools

import (
	_ "github.com/coredns/coredns"
	_ "sigs.k8s.io/kind"
)
