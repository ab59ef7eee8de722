"""Label spaces: word and sentence vectors, vocabularies, WordNet."""
