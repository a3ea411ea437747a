"""SugarCrepe / SugarCrepe++ evaluators on tiny hand-made data with a fake embedder."""

import json
import os

import numpy as np
import pytest

from g2e.data import prompts
from g2e.data.errors import BadInput
from g2e.evaluation import sugarcrepe

# Embeddings in 3-d, chosen by hand. Images are candidates (text <|image_pad|>), captions are
# queries with the SugarCrepe prefix; the fake embedder checks both.
IMAGES = {"000000000001.jpg": [1.0, 0.0, 0.0], "000000000002.jpg": [0.0, 1.0, 0.0]}
CAPTIONS = {
    "a red cat": [1.0, 0.1, 0.0],  # close to image 1
    "a cat in red": [0.9, 0.0, 0.3],  # close to image 1 and to "a red cat"
    "a blue cat": [0.2, 0.0, 1.0],  # far from image 1
    "a dog": [0.0, 1.0, 0.2],  # close to image 2
    "one dog": [0.0, 1.0, 0.25],  # close to "a dog"
    "a dog and a cat": [0.1, 1.0, 0.0],  # closer to image 2 than "a dog" is
    "two dogs": [0.0, 0.0, 1.0],
}


class FakeEmbedder:
    def __init__(self):
        self.items = []

    def __call__(self, items):
        self.items.extend(items)
        vectors = []
        for item in items:
            if item.image is not None:
                assert (item.text, item.role) == (prompts.IMAGE_PAD, "candidate")
                vectors.append(IMAGES[os.path.basename(item.image)])
            else:
                assert item.role == "query"
                assert item.text.startswith("Find me an image that matches the given caption: ")
                vectors.append(CAPTIONS[item.text.removeprefix(prompts.SUGARCREPE_CAPTION_PREFIX)])
        return np.asarray(vectors, np.float32)


def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "val2017"
    os.makedirs(root)
    for name in IMAGES:
        (root / name).write_bytes(b"fake jpeg")
    return str(root)


@pytest.fixture
def sugarcrepe_dir(tmp_path):
    """SugarCrepe's layout: {id: {filename, caption, negative_caption}} per category."""
    data = tmp_path / "sugar-crepe"
    os.makedirs(data)
    write_json(
        data / "replace_att.json",
        {
            "0": {
                "filename": "000000000001.jpg",
                "caption": "a red cat",
                "negative_caption": "a blue cat",
            },  # right
            "7": {
                "filename": "000000000002.jpg",
                "caption": "a dog",
                "negative_caption": "a dog and a cat",
            },  # wrong
            "9": {
                "filename": "000000000002.jpg",
                "caption": "a dog",
                "negative_caption": "a dog",
            },  # a tie: wrong
        },
    )
    write_json(
        data / "add_obj.json",
        {
            "3": {
                "filename": "000000000002.jpg",
                "caption": "a dog and a cat",
                "negative_caption": "two dogs",
            },  # right
        },
    )
    return str(data)


@pytest.fixture
def sugarcrepe_pp_dir(tmp_path):
    """SugarCrepe++'s layout: a list of {id, filename, caption, caption2, negative_caption}."""
    data = tmp_path / "scpp"
    os.makedirs(data)
    write_json(
        data / "swap_att.json",
        [
            # Both right: cosines with the image 0.995 and 0.949 against 0.196.
            {
                "id": 0,
                "filename": "000000000001.jpg",
                "caption": "a red cat",
                "caption2": "a cat in red",
                "negative_caption": "a blue cat",
            },
            # Image-to-text wrong, text-only right: see the test.
            {
                "id": 1,
                "filename": "000000000002.jpg",
                "caption": "a dog",
                "caption2": "one dog",
                "negative_caption": "a dog and a cat",
            },
        ],
    )
    return str(data)


def cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_sugarcrepe_scores_and_groups(sugarcrepe_dir, image_root, tmp_path):
    embedder = FakeEmbedder()
    summary = sugarcrepe.evaluate_sugarcrepe(
        embedder,
        data_dir=sugarcrepe_dir,
        image_root=image_root,
        out_dir=str(tmp_path / "out"),
        batch_size=2,
        progress=False,
    )
    assert summary["categories"] == {
        "replace_att": {"accuracy": pytest.approx(100 / 3), "num_examples": 3},
        "add_obj": {"accuracy": 100.0, "num_examples": 1},
    }
    assert summary["groups"] == {"replace": pytest.approx(100 / 3), "add": 100.0}
    assert summary["average"] == pytest.approx((100 / 3 + 100) / 2)
    # Each image and each caption text once, across categories.
    images = [i.image for i in embedder.items if i.image is not None]
    texts = [i.text for i in embedder.items if i.image is None]
    assert len(images) == len(set(images)) == 2
    assert len(texts) == len(set(texts)) == 5
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert "| accuracy | 33.3 | 100.0 | 66.7 |" in (tmp_path / "out" / "results.md").read_text()


def test_sugarcrepe_pp_image_to_text_and_text_only(sugarcrepe_pp_dir, image_root):
    image2, dog, one_dog, dog_and_cat = (
        IMAGES["000000000002.jpg"],
        CAPTIONS["a dog"],
        CAPTIONS["one dog"],
        CAPTIONS["a dog and a cat"],
    )
    # Example 1 by hand: "a dog" loses to the negative against the image, so image-to-text is
    # wrong; "a dog" and "one dog" are closer to each other than either to the negative.
    assert cos(image2, dog) < cos(image2, dog_and_cat)
    assert cos(dog, one_dog) > max(cos(dog, dog_and_cat), cos(one_dog, dog_and_cat))
    summary = sugarcrepe.evaluate_sugarcrepe_pp(
        FakeEmbedder(), data_dir=sugarcrepe_pp_dir, image_root=image_root, progress=False
    )
    assert summary["categories"] == {
        "swap_att": {"image_to_text": 50.0, "text_only": 100.0, "num_examples": 2}
    }
    assert summary["average"] == {"image_to_text": 50.0, "text_only": 100.0}


def test_sugarcrepe_pp_rules_on_hand_made_vectors():
    e = np.eye(3, dtype=np.float32)
    image = np.stack([e[0], e[0], e[0]])
    caption = np.stack([e[0], e[0], e[1]])
    caption2 = np.stack([e[0], e[2], e[1]])
    negative = np.stack([e[1], e[1], e[2]])
    image_to_text, text_only = sugarcrepe.sugarcrepe_pp_correct(image, caption, caption2, negative)
    # 0: both positives beat the negative; 1: caption2 ties the negative (0 vs 0) -> wrong;
    # 2: neither positive beats the negative on the image -> wrong.
    np.testing.assert_array_equal(image_to_text, [True, False, False])
    # 0: cos(c1,c2)=1 beats 0 and 0; 1: cos(c1,c2)=0 ties cos(c1,neg)=0 -> wrong; 2: right.
    np.testing.assert_array_equal(text_only, [True, False, True])
    np.testing.assert_array_equal(
        sugarcrepe.sugarcrepe_correct(image, caption, negative), [True, True, False]
    )


def test_missing_image_errors_or_is_skipped(sugarcrepe_dir, image_root):
    os.remove(os.path.join(image_root, "000000000001.jpg"))
    with pytest.raises(BadInput, match="replace_att.*row 0.*missing image"):
        sugarcrepe.evaluate_sugarcrepe(
            FakeEmbedder(), data_dir=sugarcrepe_dir, image_root=image_root, progress=False
        )
    summary = sugarcrepe.evaluate_sugarcrepe(
        FakeEmbedder(),
        data_dir=sugarcrepe_dir,
        image_root=image_root,
        on_bad_input="skip",
        categories="replace_att",
        progress=False,
    )
    assert summary["skipped"] == 1
    assert summary["categories"] == {"replace_att": {"accuracy": 0.0, "num_examples": 2}}


def test_missing_category_file_names_what_is_there(sugarcrepe_dir, image_root):
    with pytest.raises(FileNotFoundError, match="swap_obj.json.*add_obj.json"):
        sugarcrepe.evaluate_sugarcrepe(
            FakeEmbedder(),
            data_dir=sugarcrepe_dir,
            image_root=image_root,
            categories=["swap_obj"],
            progress=False,
        )
    with pytest.raises(FileNotFoundError, match="none of SugarCrepe\\+\\+'s files"):
        sugarcrepe.evaluate_sugarcrepe_pp(
            FakeEmbedder(),
            data_dir=sugarcrepe_dir + "/nowhere",
            image_root=image_root,
            progress=False,
        )


def test_inputs_the_embedder_skipped_drop_their_examples(sugarcrepe_dir, image_root):

    class SkipsBlueCat(FakeEmbedder):
        """NaN for one caption, as the Embedder returns for an input it skipped as bad."""

        def __call__(self, items):
            embeddings = super().__call__(items)
            embeddings[[i.text.endswith("a blue cat") for i in items]] = np.nan
            return embeddings

    run = dict(
        data_dir=sugarcrepe_dir, image_root=image_root, categories="replace_att", progress=False
    )
    with pytest.raises(ValueError, match="SugarCrepe captions.*non-finite"):
        sugarcrepe.evaluate_sugarcrepe(SkipsBlueCat(), **run)
    summary = sugarcrepe.evaluate_sugarcrepe(SkipsBlueCat(), on_bad_input="skip", **run)
    assert summary["categories"] == {"replace_att": {"accuracy": 0.0, "num_examples": 2}}
    assert summary["skipped"] == 1
