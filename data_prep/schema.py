"""What a prepared dataset is called and which record format it has; shared by ``prep`` and the
TFDS builder without either importing the other."""

import numpy as np

DATASET_NAME = "decipher_mri"
FORMAT_VERSION = "1.2.0"  # 1.1: series_description; 1.2: uint16 label maps (label ids above 255 kept)
LABEL_DTYPE = np.uint16  # FreeSurfer aseg ids go to 2035; prep refuses labels that do not fit
