"""`bilora-dist train` as a script, for `deepspeed launch/train.py ...` and `torchrun ... launch/train.py ...`:
`python launch/train.py --help` lists every flag."""

from bilora_dist.cli import exit_process, run_cli, train_main

if __name__ == "__main__":
    exit_process(run_cli(train_main))
