//go:build tools

// Package tools pins the helm and kubeconform commands the lab builds.
package tools

import (
	_ "github.com/yannh/kubeconform/cmd/kubeconform"
	_ "helm.sh/helm/v3/cmd/helm"
)
