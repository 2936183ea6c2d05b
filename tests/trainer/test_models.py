"""Models by config / local path, HF tokenizers trained locally (nothing downloaded)."""
import torch


def test_policy_from_local_path(sft_run):
    from rlhf_kernels.trainer.models import ByteTokenizer, ModelConfig, build_policy
    model, tok = build_policy(ModelConfig(model=sft_run["dir"]))
    assert isinstance(tok, ByteTokenizer)
    sd, ref = model.state_dict(), sft_run["model"].state_dict()
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k])


def test_sft_with_a_locally_trained_hf_tokenizer(tmp_path, tiny):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer.models import HFTokenizer, load_tokenizer
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft

    rows = get_task().sft_data(200, 0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([r["prompt"] + r["response"] for r in rows],
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>", "<pad>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("abc:") + [tok.eos_id]) == "abc:"
    _, _, hist = train_sft(SFTConfig(**tiny, tokenizer=str(tmp_path / "tok"), out_dir=str(tmp_path / "run"),
                                     steps=20, batch_size=16, lr=3e-3), rows=rows)
    assert hist[-1]["loss"] < hist[0]["loss"]
