"""The command floor: one module per command (parse the flags, call one library function, print its result) and
`arguments`, what they share. Nothing in spark3r imports from here."""
