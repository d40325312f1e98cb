"""Stage 2: fine-tune the pixel decoder of a stage-1 tokenizer (paper Sec. 3.2, "Decoder
Finetuning"). The encoder is frozen; no flow noise, no mask, no KL, no teacher; the GAN is on from
epoch 0.

  torchrun --nproc_per_node=8 finetune_decoder.py --tokenizer out/rectok/tokenizer.pt \
      --data /data/imagenet/train --out_dir out/rectok        # or the authors' RecTok.pth
  python finetune_decoder.py --demo                           # reads out/demo/tokenizer.pt
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist

import pretrained
from plumbing import check_args, parse_args, start_log
from train_tokenizer import DEMO_BOTH_STAGES, common_args, input_files, train

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
    path = args.tokenizer or args.out_dir and os.path.join(args.out_dir, "tokenizer.pt")
    check_args(args, [not (args.data or args.demo)
                      and "--data is required (an ImageNet-style train folder), or use --demo"],
               dict(input_files(args), **{"--tokenizer": (path, "a tokenizer checkpoint")}))
    # processes: under torchrun one per GPU (NCCL) or per CPU slot (gloo), else one
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start_log(args, "tokenizer_ft", rank, world, device)
    torch.manual_seed(args.seed)  # the same on every rank
    # Like the released code: the model starts from the raw stage-1 weights, its EMA from the
    # stage-1 EMA decoder; the frozen encoder is the raw one in both (the authors' EMA copies frozen
    # weights).
    model = pretrained.load_tokenizer(path, ema=False, gamma=0.0, mask_ratio=0.0)
    ema_decoder = pretrained.load_tokenizer(path, ema=True).decoder.state_dict()
    model.sem_decoder = None
    model.sem_decoders = None
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    # unused without masking; keeps DDP free of unused params
    model.decoder.mask_token.requires_grad_(False)
    # what a resume must match
    args.img_size = model.grid * model.decoder.patch_size
    args.dim = model.dim
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema.decoder.load_state_dict(ema_decoder)
    train(args, "tokenizer_ft", model, ema, None, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
