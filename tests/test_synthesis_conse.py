"""The conse teacher's gradient paths, which data-free synthesis uses with real weights: a style
pseudo-word injected into its sentence encoder (a BERT's word embeddings) and image gradients
through its EfficientNet-Lite classifier."""
import pytest
import torch


@pytest.fixture(scope="module")
def conse(conse_teacher):
    return conse_teacher  # the session's (conftest): skipped there without the offline extra


@pytest.mark.slow  # one more conse load (it embeds 1,000 ImageNet prompts): 10-30 s on 2 cores
def test_conse_injected_word_equals_the_word_and_gradients_reach_style_and_pixels(conse):
    word = conse.word_embeddings(["dog"])  # one WordPiece token
    assert word.shape == (1, conse.token_table().shape[1]) == (1, 384)
    styled = conse.encode_text_styled(["a photo of a *"], word)
    torch.testing.assert_close(styled, conse.encode_text(["a photo of a dog"]).to(styled.device), atol=1e-5, rtol=1e-5)
    s = torch.zeros(2, 384, requires_grad=True)
    (g,) = torch.autograd.grad(conse.encode_text_styled(["a * style of a dog"] * 2, s).sum(), [s])
    assert g.abs().sum() > 0

    x = torch.rand(2, 3, 96, 96, requires_grad=True)  # any size the classifier takes
    emb = conse.encode_image_grad(x)
    assert emb.shape == (2, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(emb.detach().cpu(), conse.encode_image(x.detach()))
    (gx,) = torch.autograd.grad(emb[:, 0].sum(), [x])
    assert gx.abs().sum() > 0
    assert all(p.grad is None for p in conse.classifier.parameters())


@pytest.mark.slow
def test_counting_a_long_prompts_tokens_says_nothing_of_its_own(conse, capfd, caplog):
    """Counting tokens (for the truncation the store records and warns about) printed transformers'
    own "Token indices sequence length is longer ..." beside embedcache's warning."""
    assert conse.count_tokens(["word " * 600]) == [602]
    assert "sequence length" not in capfd.readouterr().err + caplog.text  # pytest takes the log record
