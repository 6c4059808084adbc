import json


class PretrainedConfig:
    def __init__(self, data):
        self.data = data
        self.architecture = data["architecture"]
        self.rank = 0

    @classmethod
    def from_json_file(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def set_rank(self, rank):
        if not 0 <= rank < self.data["mapping"]["world_size"]:
            raise ValueError(f"rank {rank} outside world_size {self.data['mapping']['world_size']}")
        self.rank = rank
