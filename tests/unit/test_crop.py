import pytest

from megatron_speech.data.crop import crop_num_frames
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config

GEOMETRY = Wav2Vec2Config().geometry  # stride 320, receptive field 400


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("shortest", [16_000, 32_123, 48_000, 320_000, 400_000])
def test_crop_is_the_largest_multiple_of_tp_that_fits(tp, shortest):
    max_samples = 320_000
    f = crop_num_frames(shortest, max_samples, tp, min_frames=7, geometry=GEOMETRY)
    assert f % tp == 0
    assert GEOMETRY.num_samples(f) <= min(shortest, max_samples)
    assert GEOMETRY.num_samples(f + tp) > min(shortest, max_samples)  # the next multiple of tp does not fit


def test_too_short_is_refused_with_the_rule():
    with pytest.raises(ValueError, match=r"at least 8 frames, a multiple of 8 \(2640 samples"):
        crop_num_frames(2000, 320_000, tp=8, min_frames=7, geometry=GEOMETRY)
    with pytest.raises(ValueError, match="never padded"):
        crop_num_frames(399, 320_000, tp=1, min_frames=1, geometry=GEOMETRY)


def test_frame_i_covers_its_samples():
    # 49 frames need 15760 samples: 320 * 48 + 400
    assert GEOMETRY.num_samples(49) == 15_760
    assert crop_num_frames(15_760, 10**9, 1, 1, GEOMETRY) == 49
    assert crop_num_frames(15_759, 10**9, 1, 1, GEOMETRY) == 48
