"""Model files, one idea per module:

- files:   reading tensors and JSON, writing atomically, each failure one line naming the file
- names:   where each weight lives in an original single file or a diffusers folder
- configs: an SD-1.5 architecture told by a checkpoint's shapes or config files
- foreign: what a file or folder is when it is not a model minisd loads
- reading: SD-1.5 single files, diffusers folders and hub ids
- writing: SD-1.5 as a single file or a diffusers folder
- bert:    Hugging Face BERT folders (the chest-X-ray LDM's text encoder)
- cxr:     the chest-X-ray LDM's folder
"""
