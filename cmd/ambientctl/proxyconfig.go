package main

import (
	"bytes"
	"context"
	"io"

	"sigs.k8s.io/yaml"
)

func proxyConfig(ctx context.Context, k *kube, inv invocation, out io.Writer) error {
	ns, pod := inv.podNS, inv.pod
	if ns == "" {
		ns = k.meshNamespace(ctx)
	}
	if pod == "" {
		var err error
		if pod, err = k.firstZtunnel(ctx, ns); err != nil {
			return err
		}
	}
	raw, err := k.adminGet(ctx, ns, pod, "/config_dump")
	if err != nil {
		return err
	}
	d, err := parseConfigDump(raw)
	if err != nil {
		return err
	}
	if inv.opts.output == "yaml" {
		var buf bytes.Buffer
		if err := renderProxyConfig(&buf, d, inv.sub, "json"); err != nil {
			return err
		}
		y, err := yaml.JSONToYAML(buf.Bytes())
		if err != nil {
			return err
		}
		_, err = out.Write(y)
		return err
	}
	return renderProxyConfig(out, d, inv.sub, inv.opts.output)
}
