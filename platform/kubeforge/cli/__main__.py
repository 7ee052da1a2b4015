"""`python -m kubeforge.cli`: the `kubeforge` command."""

from kubeforge.cli import main

main()
