package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// plot draws the latency distributions of a bench-mesh results.json: one
// cumulative curve per mode and path, so mesh and direct can be compared at
// every percentile.
func plot(args []string) error {
	fs := flag.NewFlagSet("plot", flag.ExitOnError)
	in := fs.String("in", "results.json", "bench-mesh results")
	out := fs.String("out", "latency.png", "PNG to write")
	fs.Parse(args)
	b, err := os.ReadFile(*in)
	if err != nil {
		return err
	}
	var doc struct {
		Time, Loadavg, Latency string
		Results                []struct {
			Mode, Path string
			CDF        [][2]float64
		}
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return err
	}
	const w, h, left, right, top, bottom = 1000, 600, 70, 270, 50, 60
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	// x: latency up to the largest 99th percentile seen (long tails clipped).
	xmax := 0.0
	for _, r := range doc.Results {
		for _, p := range r.CDF {
			if p[1] <= 99.5 {
				xmax = math.Max(xmax, p[0])
			}
		}
	}
	if xmax == 0 {
		return fmt.Errorf("no latency data in %s", *in)
	}
	xmax = niceCeil(xmax)
	px := func(ms float64) int { return left + int(math.Min(ms/xmax, 1)*float64(w-left-right)) }
	py := func(pct float64) int { return h - bottom - int(pct/100*float64(h-top-bottom)) }
	grey := color.RGBA{200, 200, 200, 255}
	for i := 0; i <= 10; i++ {
		stroke(img, left, py(float64(i*10)), w-right, py(float64(i*10)), grey, false)
		text(img, 20, py(float64(i*10))+4, fmt.Sprintf("%d%%", i*10), color.Black)
		x := left + i*(w-left-right)/10
		stroke(img, x, top, x, h-bottom, grey, false)
		text(img, x-12, h-bottom+18, fmt.Sprintf("%.2g", xmax*float64(i)/10), color.Black)
	}
	text(img, left, h-bottom+42, "latency (ms), 1 KiB POST echoed; y: share of requests at most that slow", color.Black)
	text(img, left, 20, fmt.Sprintf("bench-mesh %s (load %s): %s", doc.Time, doc.Loadavg, doc.Latency), color.Black)
	colors := map[string]color.RGBA{"direct": {0, 0, 0, 255}, "ztunnel": {31, 119, 180, 255}, "ztunnel+waypoint": {214, 39, 40, 255}}
	for i, r := range doc.Results {
		c := colors[r.Mode]
		dashed := r.Path == "cross-node"
		prevX, prevY := px(0), py(0)
		for _, p := range r.CDF {
			x, y := px(p[0]), py(p[1])
			stroke(img, prevX, prevY, x, y, c, dashed)
			prevX, prevY = x, y
		}
		ly := top + 20 + i*20
		stroke(img, w-right+10, ly, w-right+40, ly, c, dashed)
		text(img, w-right+45, ly+4, r.Mode+" "+r.Path, color.Black)
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer f.Close()
	return png.Encode(f, img)
}

func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func text(img *image.RGBA, x, y int, s string, c color.Color) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

// stroke draws with Bresenham's algorithm, two pixels thick, dashed or not.
func stroke(img *image.RGBA, x0, y0, x1, y1 int, c color.Color, dashed bool) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e, n := dx+dy, 0
	for {
		if !dashed || (n/6)%2 == 0 {
			img.Set(x0, y0, c)
			img.Set(x0, y0+1, c)
		}
		n++
		if x0 == x1 && y0 == y1 {
			return
		}
		if e2 := 2 * e; e2 >= dy {
			e += dy
			x0 += sx
		} else {
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
	case v > 0:
		return 1
	case v < 0:
		return -1
	}
	return 0
}
