import peft
import pytest
import torch
import torch.nn.functional as F

from fullscale.loss import IGNORE_INDEX, LabelledHead, token_loss_sum
from tiny import make_model


def reference_loss(logits, labels):
    """The textbook form: slice the logits, shift the labels."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX          # a prompt
    labels[1, :] = IGNORE_INDEX           # a row with no label at all
    labels[2, 9:] = IGNORE_INDEX          # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def lora_model():
    torch.manual_seed(0)
    model = make_model(hidden_size=32)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))


def test_full_logits_give_the_textbook_loss_and_count():
    logits = torch.randn(3, 12, 50)
    _, labels = batch(50)
    total, count = token_loss_sum(logits, labels)
    torch.testing.assert_close(total, reference_loss(logits, labels))
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()


def test_the_head_runs_only_at_labelled_positions_with_the_same_loss_and_gradients():
    model = lora_model()
    inputs, labels = batch(model.config.vocab_size)
    full = model(**inputs).logits
    total_full, count_full = token_loss_sum(full, labels)
    total_full.backward()
    grads_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    head = LabelledHead(model)
    with head.only_labelled(labels):
        selected = model(**inputs).logits
    assert selected.shape == (int(count_full), model.config.vocab_size)
    total, count = token_loss_sum(selected, labels)
    assert count == count_full
    torch.testing.assert_close(total, total_full)
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_full[n], msg=n)
    # Outside the context the model is unchanged (generation, export checks).
    assert model(**inputs).logits.shape == full.shape
    head.remove()


def test_a_batch_without_labels_gives_zero_loss_and_a_usable_backward():
    model = lora_model()
    inputs, labels = batch(model.config.vocab_size)
    labels[:] = IGNORE_INDEX
    head = LabelledHead(model)
    with head.only_labelled(labels):
        logits = model(**inputs).logits
    total, count = token_loss_sum(logits, labels)
    assert count == 0 and total.item() == pytest.approx(0.0)
    total.backward()
