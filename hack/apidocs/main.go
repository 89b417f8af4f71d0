// Command apidocs writes the Markdown API reference (docs/api-reference.md)
// from the Go API types: doc comments become descriptions and kubebuilder
// markers become defaults and validation. Run by `make generate`.
package main

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"
)

func main() {
	dir := flag.String("dir", "api/v1alpha1", "package directory of the API types")
	flag.Parse()
	pkg, err := load(*dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "apidocs:", err)
		os.Exit(1)
	}
	if err := render(os.Stdout, pkg); err != nil {
		fmt.Fprintln(os.Stderr, "apidocs:", err)
		os.Exit(1)
	}
}

// typeDoc is one named type of the API package.
type typeDoc struct {
	Name    string
	Doc     []string // description lines, markers removed
	Markers []string // +kubebuilder markers
	Struct  *ast.StructType
	Under   string // underlying type for non-structs (string enums)
}

type apiPackage struct {
	Group, Version string
	Types          map[string]*typeDoc
	Roots          []string // kinds with +kubebuilder:object:root and a Spec
}

func load(dir string) (*apiPackage, error) {
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, dir, func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go") && !strings.HasPrefix(fi.Name(), "zz_generated")
	}, parser.ParseComments)
	if err != nil {
		return nil, err
	}
	p := &apiPackage{Types: map[string]*typeDoc{}}
	for _, pkg := range pkgs {
		files := make([]string, 0, len(pkg.Files))
		for name := range pkg.Files {
			files = append(files, name)
		}
		sort.Strings(files)
		for _, name := range files {
			collect(p, fset, pkg.Files[name])
		}
	}
	sort.Strings(p.Roots)
	if p.Group == "" {
		return nil, fmt.Errorf("no +groupName marker in %s", dir)
	}
	return p, nil
}

// leadingMarkers returns the markers of comment groups directly above pos,
// including groups separated from the doc comment by one blank line (the
// kubebuilder convention for type markers).
func leadingMarkers(fset *token.FileSet, f *ast.File, pos token.Pos) []string {
	line := fset.Position(pos).Line
	var out []string
	for i := len(f.Comments) - 1; i >= 0; i-- {
		g := f.Comments[i]
		if g.End() >= pos {
			continue
		}
		if fset.Position(g.End()).Line < line-2 {
			break
		}
		_, m := splitDoc(g)
		out = append(m, out...)
		line = fset.Position(g.Pos()).Line
	}
	return out
}

func collect(p *apiPackage, fset *token.FileSet, f *ast.File) {
	if f.Doc != nil {
		for _, c := range f.Doc.List {
			if v, ok := strings.CutPrefix(c.Text, "// +groupName="); ok {
				p.Group = v
				p.Version = f.Name.Name
			}
		}
	}
	for _, decl := range f.Decls {
		gd, ok := decl.(*ast.GenDecl)
		if !ok || gd.Tok != token.TYPE {
			continue
		}
		for _, spec := range gd.Specs {
			ts := spec.(*ast.TypeSpec)
			doc := gd.Doc
			if ts.Doc != nil {
				doc = ts.Doc
			}
			td := &typeDoc{Name: ts.Name.Name}
			td.Doc, _ = splitDoc(doc)
			td.Markers = leadingMarkers(fset, f, gd.Pos())
			switch t := ts.Type.(type) {
			case *ast.StructType:
				td.Struct = t
			default:
				td.Under = exprString(t)
			}
			p.Types[td.Name] = td
			if hasMarker(td.Markers, "+kubebuilder:object:root=true") && hasField(td.Struct, "Spec") {
				p.Roots = append(p.Roots, td.Name)
			}
		}
	}
}

func hasField(s *ast.StructType, name string) bool {
	if s == nil {
		return false
	}
	for _, f := range s.Fields.List {
		for _, n := range f.Names {
			if n.Name == name {
				return true
			}
		}
	}
	return false
}

func hasMarker(markers []string, m string) bool {
	for _, x := range markers {
		if x == m {
			return true
		}
	}
	return false
}

// splitDoc separates prose from +markers.
func splitDoc(cg *ast.CommentGroup) (doc, markers []string) {
	if cg == nil {
		return nil, nil
	}
	for _, c := range cg.List {
		line := strings.TrimSpace(strings.TrimPrefix(strings.TrimPrefix(c.Text, "//"), " "))
		if strings.HasPrefix(line, "+") {
			markers = append(markers, line)
			continue
		}
		doc = append(doc, line)
	}
	return doc, markers
}

func exprString(e ast.Expr) string {
	switch t := e.(type) {
	case *ast.Ident:
		return t.Name
	case *ast.StarExpr:
		return exprString(t.X)
	case *ast.ArrayType:
		return "[]" + exprString(t.Elt)
	case *ast.MapType:
		return "map[" + exprString(t.Key) + "]" + exprString(t.Value)
	case *ast.SelectorExpr:
		return exprString(t.X) + "." + t.Sel.Name
	}
	return fmt.Sprintf("%T", e)
}

// external types link to the Kubernetes API reference.
var external = map[string]string{
	"corev1.ResourceRequirements": "[ResourceRequirements](https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#resources)",
	"corev1.Toleration":           "[Toleration](https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#scheduling)",
	"corev1.LocalObjectReference": "[LocalObjectReference](https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/local-object-reference/)",
	"metav1.Duration":             "duration (e.g. `24h`, `90m`)",
	"metav1.Time":                 "timestamp (RFC 3339)",
	"metav1.Condition":            "[Condition](https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/condition/)",
	"metav1.ObjectMeta":           "[ObjectMeta](https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/object-meta/)",
}

func render(w io.Writer, p *apiPackage) error {
	gv := p.Group + "/" + p.Version
	fmt.Fprintf(w, "# API reference\n\n<!-- Generated by hack/apidocs from api/%s (make generate). Do not edit. -->\n\n", p.Version)
	fmt.Fprintf(w, "Group version: `%s`\n\n", gv)
	for _, root := range p.Roots {
		fmt.Fprintf(w, "- [%s](#%s)\n", root, anchor(root))
	}
	fmt.Fprintln(w)
	seen := map[string]bool{}
	for _, root := range p.Roots {
		queue := []string{root}
		for len(queue) > 0 {
			name := queue[0]
			queue = queue[1:]
			if seen[name] {
				continue
			}
			seen[name] = true
			queue = append(queue, renderType(w, p, name, name == root, gv)...)
		}
	}
	return nil
}

func anchor(name string) string { return strings.ToLower(name) }

// renderType writes one struct's section and returns the local struct
// types it refers to.
func renderType(w io.Writer, p *apiPackage, name string, root bool, gv string) []string {
	td := p.Types[name]
	level := "###"
	if root {
		level = "##"
	}
	fmt.Fprintf(w, "%s %s\n\n", level, name)
	if len(td.Doc) > 0 {
		fmt.Fprintf(w, "%s\n\n", strings.Join(td.Doc, " "))
	}
	if root {
		scope := "Namespaced"
		for _, m := range td.Markers {
			if strings.Contains(m, "scope=Cluster") {
				scope = "Cluster"
			}
		}
		fmt.Fprintf(w, "`apiVersion: %s`, `kind: %s`, scope: %s.\n\n", gv, name, scope)
		var cols []string
		for _, m := range td.Markers {
			if v, ok := strings.CutPrefix(m, "+kubebuilder:printcolumn:name="); ok {
				cols = append(cols, strings.Trim(strings.SplitN(v, ",", 2)[0], `"`))
			}
		}
		if len(cols) > 0 {
			fmt.Fprintf(w, "`kubectl get` columns: %s.\n\n", strings.Join(cols, ", "))
		}
	}
	if rules := markerValues(td.Markers, "+kubebuilder:validation:XValidation:"); len(rules) > 0 {
		fmt.Fprintln(w, "Rules:")
		for _, r := range rules {
			fmt.Fprintf(w, "- %s\n", celMessage(r))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "| Field | Type | Description | Default | Validation |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	var refs []string
	for _, f := range td.Struct.Fields.List {
		jsonName, inline := jsonTag(f)
		if jsonName == "-" || inline || jsonName == "" {
			continue
		}
		typ := exprString(f.Type)
		doc, markers := splitDoc(f.Doc)
		typeCell, ref := typeCell(p, typ)
		if ref != "" {
			refs = append(refs, ref)
		}
		// The field's type may carry enum markers.
		base := strings.TrimPrefix(strings.TrimPrefix(typ, "[]"), "*")
		if t, ok := p.Types[base]; ok && t.Struct == nil {
			markers = append(markers, t.Markers...)
		}
		optional := hasMarker(markers, "+optional")
		desc := strings.Join(doc, " ")
		if !optional && !root {
			desc = "**Required.** " + desc
		}
		fmt.Fprintf(w, "| `%s` | %s | %s | %s | %s |\n", jsonName, typeCell, escape(desc), escape(defaultOf(markers)), escape(validationOf(markers)))
	}
	fmt.Fprintln(w)
	return refs
}

func jsonTag(f *ast.Field) (string, bool) {
	if f.Tag == nil {
		return "", false
	}
	tag := reflect.StructTag(strings.Trim(f.Tag.Value, "`")).Get("json")
	parts := strings.Split(tag, ",")
	for _, p := range parts[1:] {
		if p == "inline" {
			return parts[0], true
		}
	}
	return parts[0], false
}

func typeCell(p *apiPackage, typ string) (cell, ref string) {
	prefix := ""
	base := typ
	for {
		switch {
		case strings.HasPrefix(base, "[]"):
			prefix += "[]"
			base = base[2:]
			continue
		case strings.HasPrefix(base, "map["):
			return "`" + typ + "`", ""
		}
		break
	}
	if link, ok := external[base]; ok {
		return prefix + link, ""
	}
	if t, ok := p.Types[base]; ok {
		if t.Struct != nil {
			return fmt.Sprintf("%s[%s](#%s)", prefix, base, anchor(base)), base
		}
		return prefix + "`" + t.Under + "`", ""
	}
	return prefix + "`" + base + "`", ""
}

func markerValues(markers []string, prefix string) []string {
	var out []string
	for _, m := range markers {
		if v, ok := strings.CutPrefix(m, prefix); ok {
			out = append(out, v)
		}
	}
	return out
}

func celMessage(rule string) string {
	if i := strings.Index(rule, `message="`); i >= 0 {
		return strings.TrimSuffix(rule[i+len(`message="`):], `"`)
	}
	return "`" + rule + "`"
}

func defaultOf(markers []string) string {
	if v := markerValues(markers, "+kubebuilder:default="); len(v) > 0 {
		return "`" + strings.Trim(v[0], `"`) + "`"
	}
	return ""
}

func validationOf(markers []string) string {
	var parts []string
	for _, m := range markers {
		v, ok := strings.CutPrefix(m, "+kubebuilder:validation:")
		if !ok {
			if m == "+listType=set" {
				parts = append(parts, "unique items")
			}
			continue
		}
		key, val, _ := strings.Cut(v, "=")
		switch key {
		case "Enum":
			parts = append(parts, "one of "+strings.ReplaceAll(val, ";", ", "))
		case "Minimum":
			parts = append(parts, "≥ "+val)
		case "Maximum":
			parts = append(parts, "≤ "+val)
		case "MinLength":
			parts = append(parts, "length ≥ "+val)
		case "MaxLength":
			parts = append(parts, "length ≤ "+val)
		case "MaxItems":
			parts = append(parts, "at most "+val+" items")
		case "Pattern":
			parts = append(parts, "matches `"+strings.Trim(val, "`")+"`")
		case "XValidation:rule":
			parts = append(parts, celMessage(v))
		}
	}
	return strings.Join(parts, "; ")
}

func escape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
