// Command scaleplot draws the scale scenarios' results (the JSON lines
// test/scale appends to SCALE_OUT) as a PNG: convergence p99 and bytes
// pushed per pod change against the number of pods (log scale), one line
// per scenario.
// Standard library only (a 3x5 pixel font for the labels).
//
//	go run ./hack/scaleplot -in results.jsonl -out docs/scale.png
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"log"
	"math"
	"os"
	"sort"
	"strings"
)

type result struct {
	Scenario string  `json:"scenario"`
	Nodes    int     `json:"nodes"`
	Pods     int     `json:"pods"`
	P99ms    float64 `json:"p99_ms"`
	RunP99ms float64 `json:"running_p99_ms"`
	BytesPer float64 `json:"bytes_per_change_net_of_idle"`
}

// series picks one value per run for a panel's line.
type series struct {
	label    string
	scenario string // prefix of the scenario name
	value    func(result) float64
	color    color.RGBA
}

var (
	blue  = color.RGBA{31, 119, 180, 255}
	red   = color.RGBA{214, 39, 40, 255}
	green = color.RGBA{44, 160, 44, 255}
	grey  = color.RGBA{150, 150, 150, 255}
	black = color.RGBA{0, 0, 0, 255}
)

func main() {
	in := flag.String("in", "results.jsonl", "JSON lines from test/scale (SCALE_OUT)")
	out := flag.String("out", "scale.png", "PNG to write")
	flag.Parse()
	results, err := read(*in)
	if err != nil {
		log.Fatal(err)
	}
	img := image.NewRGBA(image.Rect(0, 0, 1030, 430))
	fill(img, img.Bounds(), color.RGBA{255, 255, 255, 255})
	panel(img, image.Rect(70, 40, 480, 360), "CONVERGENCE P99 MS", results, []series{
		{"ONE AT A TIME, FROM CREATE", "steady-one-at-a-time", func(r result) float64 { return r.P99ms }, blue},
		{"CHURN, FROM RUNNING", "churn", func(r result) float64 { return r.RunP99ms }, red},
		{"5000-EP SERVICE, FROM RUNNING", "service-scale-0", func(r result) float64 { return r.RunP99ms }, green},
	})
	panel(img, image.Rect(570, 40, 980, 360), "BYTES PUSHED PER POD CHANGE, NET OF IDLE", results, []series{
		{"ONE AT A TIME", "steady-one-at-a-time", func(r result) float64 { return r.BytesPer }, blue},
		{"CHURN", "churn", func(r result) float64 { return r.BytesPer }, red},
		{"5000-EP SERVICE UP", "service-scale-0", func(r result) float64 { return r.BytesPer }, green},
	})
	f, err := os.Create(*out)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if err := png.Encode(f, img); err != nil {
		log.Fatal(err)
	}
}

func read(path string) ([]result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rs []result
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		rs = append(rs, r)
	}
	return rs, sc.Err()
}

type point struct{ x, y float64 }

// panel draws axes from 0 to the largest value, ticks at each run's pod
// count, and one polyline per series.
func panel(img *image.RGBA, r image.Rectangle, title string, results []result, ss []series) {
	lines := make([][]point, len(ss))
	var xs []float64
	nodes := map[float64]int{} // pods -> nodes (= clients) of that run
	maxX, maxY := 0.0, 0.0
	for i, s := range ss {
		for _, res := range results {
			if !strings.HasPrefix(res.Scenario, s.scenario) {
				continue
			}
			p := point{float64(res.Pods), s.value(res)}
			lines[i] = append(lines[i], p)
			maxX, maxY = max(maxX, p.x), max(maxY, p.y)
			if !contains(xs, p.x) {
				xs = append(xs, p.x)
			}
			nodes[p.x] = res.Nodes
		}
		sort.Slice(lines[i], func(a, b int) bool { return lines[i][a].x < lines[i][b].x })
	}
	if maxX == 0 || maxY == 0 {
		return
	}
	maxY *= 1.1
	// x is logarithmic, from half the smallest run to the largest.
	minX := maxX
	for _, x := range xs {
		minX = min(minX, x)
	}
	lo, hi := math.Log10(minX/2), math.Log10(maxX)
	at := func(p point) (int, int) {
		return r.Min.X + int((math.Log10(p.x)-lo)/(hi-lo)*float64(r.Dx())), r.Max.Y - int(p.y/maxY*float64(r.Dy()))
	}
	atY := func(y float64) int { return r.Max.Y - int(y/maxY*float64(r.Dy())) }
	text(img, r.Min.X, r.Min.Y-28, title, black)
	line(img, r.Min.X, r.Max.Y, r.Max.X, r.Max.Y, black)
	line(img, r.Min.X, r.Min.Y, r.Min.X, r.Max.Y, black)
	for _, x := range xs {
		px, _ := at(point{x, 1})
		line(img, px, r.Max.Y, px, r.Max.Y+5, black)
		label := fmt.Sprintf("%.0f", x)
		if x >= 1000 {
			label = fmt.Sprintf("%.0fK", x/1000)
		}
		text(img, px-12, r.Max.Y+10, label, black)
		text(img, px-12, r.Max.Y+24, fmt.Sprintf("%dN", nodes[x]), grey)
	}
	text(img, r.Max.X-90, r.Max.Y+40, "PODS / NODES", black)
	for k := 0; k <= 4; k++ {
		y := maxY * float64(k) / 4
		py := atY(y)
		line(img, r.Min.X-5, py, r.Min.X, py, black)
		if k > 0 {
			line(img, r.Min.X+1, py, r.Max.X, py, color.RGBA{230, 230, 230, 255})
		}
		text(img, r.Min.X-60, py-4, fmt.Sprintf("%.0f", y), black)
	}
	for i, s := range ss {
		for j, p := range lines[i] {
			x, y := at(p)
			fill(img, image.Rect(x-3, y-3, x+4, y+4), s.color)
			if j > 0 {
				x0, y0 := at(lines[i][j-1])
				line(img, x0, y0, x, y, s.color)
			}
		}
		fill(img, image.Rect(r.Min.X+10, r.Min.Y+6+14*i, r.Min.X+20, r.Min.Y+14+14*i), s.color)
		text(img, r.Min.X+26, r.Min.Y+6+14*i, s.label, grey)
	}
}

func contains(xs []float64, x float64) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			img.SetRGBA(x, y, c)
		}
	}
}

// line draws with Bresenham's algorithm, two pixels thick.
func line(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		img.SetRGBA(x0, y0, c)
		img.SetRGBA(x0+1, y0, c)
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e // both steps decided on the same error term
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v < 0:
		return -1
	case v > 0:
		return 1
	}
	return 0
}

// glyphs: 3x5 pixels, rows top to bottom, '#' set.
var glyphs = map[rune]string{
	'0': "###/#.#/#.#/#.#/###", '1': ".#./##./.#./.#./###", '2': "###/..#/###/#../###", '3': "###/..#/###/..#/###",
	'4': "#.#/#.#/###/..#/..#", '5': "###/#../###/..#/###", '6': "###/#../###/#.#/###", '7': "###/..#/..#/..#/..#",
	'8': "###/#.#/###/#.#/###", '9': "###/#.#/###/..#/###", '.': ".../.../.../.../.#.", ',': ".../.../.../.#./#..",
	'-': ".../.../###/.../...", '%': "#.#/..#/.#./#../#.#", '/': "..#/..#/.#./#../#..",
	'A': ".#./#.#/###/#.#/#.#", 'B': "##./#.#/##./#.#/##.", 'C': ".##/#../#../#../.##", 'D': "##./#.#/#.#/#.#/##.",
	'E': "###/#../##./#../###", 'F': "###/#../##./#../#..", 'G': ".##/#../#.#/#.#/.##", 'H': "#.#/#.#/###/#.#/#.#",
	'I': "###/.#./.#./.#./###", 'J': "..#/..#/..#/#.#/.#.", 'K': "#.#/#.#/##./#.#/#.#", 'L': "#../#../#../#../###",
	'M': "#.#/###/###/#.#/#.#", 'N': "##./#.#/#.#/#.#/#.#", 'O': ".#./#.#/#.#/#.#/.#.", 'P': "##./#.#/##./#../#..",
	'Q': ".#./#.#/#.#/##./.##", 'R': "##./#.#/##./#.#/#.#", 'S': ".##/#../.#./..#/##.", 'T': "###/.#./.#./.#./.#.",
	'U': "#.#/#.#/#.#/#.#/###", 'V': "#.#/#.#/#.#/#.#/.#.", 'W': "#.#/#.#/###/###/#.#", 'X': "#.#/#.#/.#./#.#/#.#",
	'Y': "#.#/#.#/.#./.#./.#.", 'Z': "###/..#/.#./#../###",
}

// text draws s at twice the glyph size (6x10 per character, 8 apart).
func text(img *image.RGBA, x, y int, s string, c color.RGBA) {
	for _, ch := range strings.ToUpper(s) {
		rows := strings.Split(glyphs[ch], "/")
		for gy, row := range rows {
			for gx, px := range row {
				if px == '#' {
					fill(img, image.Rect(x+2*gx, y+2*gy, x+2*gx+2, y+2*gy+2), c)
				}
			}
		}
		x += 8
	}
}
