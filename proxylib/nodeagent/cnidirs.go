package nodeagent

import "github.com/ambientmesh/ambient/proxylib/nodeagent/cniinstall"

// installsCNI: the agent puts the plugin on the host (a directory is set,
// or the host's file system is mounted for it to find them).
func (o Options) installsCNI() bool { return o.CNIConfDir != "" || o.CNIHostRoot != "" }

// cniDirs resolves where the plugin goes, as paths this process can open.
// Without CNIHostRoot, CNIConfDir and CNIBinDir are those paths. With it,
// they are host paths under that root, and an empty one is detected
// (cniinstall.Detect) on every call: the distribution's directory may
// appear after the agent starts, and k3s moves its binaries on upgrade.
func (o Options) cniDirs() (confDir, binDir string, err error) {
	if o.CNIHostRoot == "" {
		return o.CNIConfDir, o.CNIBinDir, nil
	}
	confHost, binHost := o.CNIConfDir, o.CNIBinDir
	if confHost == "" || binHost == "" {
		l, err := cniinstall.Detect(o.CNIHostRoot)
		if err != nil {
			return "", "", err
		}
		if confHost == "" {
			confHost = l.ConfDir
		}
		if binHost == "" {
			binHost = l.BinDir
		}
	}
	if confDir, err = cniinstall.InRoot(o.CNIHostRoot, confHost); err != nil {
		return "", "", err
	}
	if binDir, err = cniinstall.InRoot(o.CNIHostRoot, binHost); err != nil {
		return "", "", err
	}
	return confDir, binDir, nil
}
