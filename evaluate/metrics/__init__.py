"""One file per metric; each records the protocol it follows next to the function."""
