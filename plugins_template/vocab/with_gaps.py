"""An extended vocabulary: the IUPAC protein letters plus alignment gaps.

Registered as `IUPAC_gapped`: the 20 amino acids, the extended codes BZXJUO, stop `*`, and the gap
characters `-` and `.` — for templates taken from a multiple sequence alignment.

    {"vocab": {"name": "IUPAC_gapped"}}
"""

from runner.core.vocab import IUPAC_AMINO_ACIDS, IUPAC_EXTENDED_CODES, STOP_CODE, BaseVocabProcessor, register_vocab


class GappedVocab(BaseVocabProcessor):
    name = "IUPAC_gapped"

    def __init__(self, case_sensitive: bool = False):
        super().__init__(IUPAC_AMINO_ACIDS + IUPAC_EXTENDED_CODES + STOP_CODE + "-.", case_sensitive=case_sensitive)


register_vocab("IUPAC_gapped", GappedVocab)
