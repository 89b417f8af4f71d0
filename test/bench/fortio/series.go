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
)

// series draws a soak's samples (make soak: bin/soak/results.json) as three
// panels over time: RSS, goroutines and the load's p99, so growth shows.
func series(args []string) error {
	fs := flag.NewFlagSet("series", flag.ExitOnError)
	in := fs.String("in", "results.json", "soak results")
	out := fs.String("out", "soak.png", "PNG to write")
	fs.Parse(args)
	b, err := os.ReadFile(*in)
	if err != nil {
		return err
	}
	var doc struct {
		Duration string
		Samples  []struct {
			AtSeconds float64
			Metrics   map[string]float64
			P99ms     float64
		}
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return err
	}
	if len(doc.Samples) < 2 {
		return fmt.Errorf("%s: fewer than two samples", *in)
	}
	type line struct {
		name  string
		c     color.RGBA
		value func(i int) float64
	}
	sample := func(key string, scale float64) func(int) float64 {
		return func(i int) float64 { return doc.Samples[i].Metrics[key] / scale }
	}
	blue, red := color.RGBA{31, 119, 180, 255}, color.RGBA{214, 39, 40, 255}
	panels := []struct {
		title string
		lines []line
	}{
		{"RSS (MiB, all pods of the component)", []line{{"ztunnel", blue, sample("ztunnel process_resident_memory_bytes", 1<<20)}, {"waypoint", red, sample("waypoint process_resident_memory_bytes", 1<<20)}}},
		{"goroutines", []line{{"ztunnel", blue, sample("ztunnel go_goroutines", 1)}, {"waypoint", red, sample("waypoint go_goroutines", 1)}}},
		{"worst p99 of the HTTP streams since the last sample (ms)", []line{{"p99", color.RGBA{0, 0, 0, 255}, func(i int) float64 { return doc.Samples[i].P99ms }}}},
	}
	const w, ph, left, right, top, gap = 1000, 220, 70, 120, 40, 40
	h := top + len(panels)*(ph+gap)
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	grey := color.RGBA{200, 200, 200, 255}
	tmax := niceCeil(math.Max(doc.Samples[len(doc.Samples)-1].AtSeconds/60, 0.1))
	text(img, left, 20, "soak "+doc.Duration+" (x: minutes)", color.Black)
	for p, panel := range panels {
		y0 := top + p*(ph+gap) + 20 // panel top
		ymax := 0.0
		for _, l := range panel.lines {
			for i := range doc.Samples {
				ymax = math.Max(ymax, l.value(i))
			}
		}
		if ymax == 0 {
			ymax = 1
		}
		ymax = niceCeil(ymax)
		px := func(sec float64) int { return left + int(sec/60/tmax*float64(w-left-right)) }
		py := func(v float64) int { return y0 + ph - int(v/ymax*float64(ph)) }
		text(img, left, y0-6, panel.title, color.Black)
		for i := 0; i <= 4; i++ {
			v := ymax * float64(i) / 4
			stroke(img, left, py(v), w-right, py(v), grey, false)
			text(img, 8, py(v)+4, fmt.Sprintf("%.4g", v), color.Black)
			x := left + i*(w-left-right)/4
			stroke(img, x, y0, x, y0+ph, grey, false)
			text(img, x-8, y0+ph+14, fmt.Sprintf("%.3g", tmax*float64(i)/4), color.Black)
		}
		for k, l := range panel.lines {
			for i := 1; i < len(doc.Samples); i++ {
				stroke(img, px(doc.Samples[i-1].AtSeconds), py(l.value(i-1)), px(doc.Samples[i].AtSeconds), py(l.value(i)), l.c, false)
			}
			ly := y0 + 20 + k*20
			stroke(img, w-right+10, ly, w-right+35, ly, l.c, false)
			text(img, w-right+40, ly+4, l.name, color.Black)
		}
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer f.Close()
	return png.Encode(f, img)
}
