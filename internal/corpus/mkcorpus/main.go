// Command mkcorpus writes the crafted corrupt image corpus of package
// corpus into a directory and lists the cases, one per line:
// NAME STAGE IMAGE.
//
//	go run ./internal/corpus/mkcorpus DIR
package main

import (
	"fmt"
	"os"

	"github.com/nbdgw/nbdgw/internal/corpus"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: mkcorpus DIR")
		os.Exit(2)
	}
	cases, err := corpus.Generate(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkcorpus:", err)
		os.Exit(1)
	}
	for _, c := range cases {
		fmt.Printf("%s %s %s\n", c.Name, c.Stage, c.Image)
	}
}
