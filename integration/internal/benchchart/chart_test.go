package benchchart

import (
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestWriteSVG: the chart is well-formed XML and names every variant.
func TestWriteSVG(t *testing.T) {
	path := filepath.Join(t.TempDir(), "charts", "unpack.svg")
	bars := []Bar{
		{Label: "(a) direct", Median: 1.55, Runs: []float64{2.55, 1.55, 1.53}},
		{Label: "(d) overlayfs", Median: 1.67, Runs: []float64{1.66, 1.72}},
		{Label: "(f) proxy", Median: 1.48},
	}
	if err := WriteSVG(path, "pull+unpack", "seconds", bars); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := xml.NewDecoder(strings.NewReader(string(data)))
	root := ""
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not valid XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q, want svg", root)
	}
	for _, b := range bars {
		if !strings.Contains(string(data), b.Label) {
			t.Errorf("chart does not name %q", b.Label)
		}
	}
}
