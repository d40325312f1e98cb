"""Stage 2: fine-tune the pixel decoder of a stage-1 tokenizer (paper Sec. 3.2, "Decoder
Finetuning"). The encoder is frozen; no flow noise, no mask, no KL, no teacher; the GAN is on from
epoch 0.

  torchrun --nproc_per_node=8 finetune_decoder.py --tokenizer out/rectok/tokenizer.pt \
      --data /data/imagenet/train --out_dir out/rectok        # or the authors' RecTok.pth
  python finetune_decoder.py --demo                           # reads out/demo/tokenizer.pt
"""
import argparse
import os

import torch.distributed as dist

import models
from plumbing import EMA, check_args, parse_args, setup
from train_tokenizer import DEMO_BOTH_STAGES, common_args, input_problems, train

DEMO = dict(DEMO_BOTH_STAGES, epochs=26, blr=3.2e-2)  # --demo: README, quick start

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--tokenizer", help="stage-1 checkpoint, ours or the authors' RecTok.pth "
                                            "(default: <out_dir>/tokenizer.pt)")
    parser.set_defaults(epochs=100, blr=5e-5, warmup_rate=0.05, disc_start_epoch=0)
    args = parse_args(parser, DEMO, argv)
    # stage 2 has neither term
    args.kl_weight = 0.0
    args.sem_weight = 0.0
    if args.tokenizer:
        path = args.tokenizer
    elif args.out_dir:
        path = os.path.join(args.out_dir, "tokenizer.pt")
    else:
        path = args.out_dir
    check_args(args, input_problems(args)
               + [path and models.file_problem("--tokenizer", path, "a tokenizer checkpoint")])
    rank, world, device = setup(args, "tokenizer_ft")
    # Like the released code: the model starts from the raw stage-1 weights, its EMA from the
    # stage-1 EMA decoder; the frozen encoder is the raw one in both (the authors' EMA copies frozen
    # weights).
    model = models.load_tokenizer(path, ema=False, gamma=0.0, mask_ratio=0.0)
    ema_decoder = models.load_tokenizer(path, ema=True).decoder.state_dict()
    model.sem_decoder = None
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    # unused without masking; keeps DDP free of unused params
    model.decoder.mask_token.requires_grad_(False)
    # what a resume must match
    args.img_size = model.grid * model.decoder.patch_size
    args.dim = model.dim
    model.to(device)
    ema = EMA(model, args.ema)
    ema.model.decoder.load_state_dict(ema_decoder)
    train(args, "tokenizer_ft", model, ema, None, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
