"""`python -m cli`: the `n2a` command, runnable where a script path is needed
(`torchrun --nproc_per_node 2 -m cli train ...`)."""

from cli.main import main

if __name__ == "__main__":
    main()
