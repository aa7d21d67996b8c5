"""Console scripts: each module parses its arguments, calls one library function and prints its result."""
