"""`python -m bilora_dist COMMAND ...` (also `torchrun -m bilora_dist` and `deepspeed --module bilora_dist`)."""

from bilora_dist.cli import console_main

if __name__ == "__main__":
    console_main()
