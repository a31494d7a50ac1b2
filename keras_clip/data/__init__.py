"""Training input: the data spec, TFRecord shards, converters, readers, augmentation."""

from keras_clip.data.augment import random_resized_crop
from keras_clip.data.augment import sample_crop_box
from keras_clip.data.augment import train_transform
from keras_clip.data.pipeline import PipelineCounters
from keras_clip.data.pipeline import csv_dataset
from keras_clip.data.pipeline import looks_like_image
from keras_clip.data.pipeline import tfds_dataset
from keras_clip.data.pipeline import tfrecord_dataset
from keras_clip.data.shards import convert_csv
from keras_clip.data.shards import convert_webdataset
from keras_clip.data.shards import read_caption_table
from keras_clip.data.shards import serialize_example
from keras_clip.data.shards import write_shards
from keras_clip.data.spec import DataSpec
from keras_clip.data.spec import RecordCount
