// Package kustomize renders a kustomize directory into objects for the
// generators that post-process the operator's manifests (hack/bundle,
// hack/release).
package kustomize

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Build runs `<bin> build <dir>` and decodes every object, in order.
func Build(bin, dir string) ([]*unstructured.Unstructured, error) {
	rendered, err := exec.Command(bin, "build", dir).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("%s build %s: %v: %s", bin, dir, err, ee.Stderr)
		}
		return nil, err
	}
	return Decode(rendered)
}

// Decode splits a multi-document YAML or JSON stream into objects,
// skipping empty documents.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if len(u.Object) > 0 {
			out = append(out, u)
		}
	}
}
