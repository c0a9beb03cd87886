"""The one shard layer every stage stands on: shard URLs and names (urls.py), the damage-aware
streaming reader (reader.py over tarstream.py) and the atomic shard writer (writer.py).
Imports stay one-way: cli -> stages -> shared layers (this, images.py, output_format.py) ->
tokenizer/."""
