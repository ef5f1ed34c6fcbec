// Package benchchart draws a benchmark's table as an SVG bar chart (with
// gonum/plot), for the README beside the text table.
package benchchart

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// Bar is one variant: its label and its runs (seconds); the bar shows the
// median, the points every run.
type Bar struct {
	Label  string
	Median float64
	Runs   []float64
}

// WriteSVG writes the bars as an SVG chart to path (its directory is made).
func WriteSVG(path, title, yLabel string, bars []Bar) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = yLabel
	p.Y.Min = 0
	values := make(plotter.Values, len(bars))
	names := make([]string, len(bars))
	var runs plotter.XYs
	for i, b := range bars {
		values[i] = b.Median
		names[i] = b.Label
		for _, r := range b.Runs {
			runs = append(runs, plotter.XY{X: float64(i), Y: r})
		}
	}
	chart, err := plotter.NewBarChart(values, vg.Points(28))
	if err != nil {
		return fmt.Errorf("draw the bars of %s: %w", title, err)
	}
	chart.Color = color.RGBA{R: 70, G: 110, B: 170, A: 255}
	chart.LineStyle.Width = 0
	p.Add(chart)
	if len(runs) > 0 {
		points, err := plotter.NewScatter(runs)
		if err != nil {
			return fmt.Errorf("draw the runs of %s: %w", title, err)
		}
		points.Color = color.Black
		points.Radius = vg.Points(1.5)
		p.Add(points)
	}
	p.NominalX(names...)
	p.Add(plotter.NewGrid())
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("make the directory of %s: %w", path, err)
	}
	width := vg.Length(len(bars))*vg.Centimeter*3 + 3*vg.Centimeter
	if err := p.Save(width, 9*vg.Centimeter, path); err != nil {
		return fmt.Errorf("write chart %s: %w", path, err)
	}
	return nil
}

// WriteReport writes a benchmark's Markdown table to dir/name.md and its
// chart to dir/name.svg (dir "" is docs/bench under root), and returns
// the two paths.
func WriteReport(root, dir, name, table, title string, bars []Bar) (string, string, error) {
	if dir == "" {
		dir = filepath.Join(root, "docs", "bench")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", fmt.Errorf("make %s: %w", dir, err)
	}
	md, svg := filepath.Join(dir, name+".md"), filepath.Join(dir, name+".svg")
	if err := os.WriteFile(md, []byte(table), 0o644); err != nil {
		return "", "", fmt.Errorf("write %s: %w", md, err)
	}
	return md, svg, WriteSVG(svg, title, "seconds", bars)
}

// Median is the median of xs (0 for none).
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
