"""What slide2vec 7.x users bring along: its YAML configs (`slide2vec_config`) and the
feature identity its sidecars record (`identity`)."""
