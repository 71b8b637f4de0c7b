"""Fine-tune with lora / bilora / lora-sam: `python launch/train.py --help` lists every flag."""

from bilora_dist.cli import exit_process, run_cli, train_main

if __name__ == "__main__":
    exit_process(run_cli(train_main))
