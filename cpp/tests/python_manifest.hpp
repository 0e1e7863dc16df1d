// manifest.json and models.json exactly as Python wrote them (engine/cache.py, engine/model_facts.py):
//   mf-build-engines --model tiny-sd15 --stages 128x128:2,256x256:2 --backend torch --device cpu --output DIR
// The torch backend's entries list no files, so the folder is these two files alone; every digest is the
// sha256 Python computed over json.dumps(key, sort_keys=True).
#ifndef MEGAFUSION_TESTS_PYTHON_MANIFEST_HPP_
#define MEGAFUSION_TESTS_PYTHON_MANIFEST_HPP_

constexpr const char* kPythonManifest = R"MF(
{
 "format": 1,
 "entries": [
  {
   "digest": "08679cb9fa0c3b7135b6d0324dded432e0bc5ee2aff707f73a7942e337ddf696",
   "key": {
    "model": "tiny-sd15",
    "weights": "c640ac4aa037338e4df99b97646d6fb2caafb5118be39a044a135dfcae796c64",
    "network": "vae_decoder",
    "variant": "standard",
    "dilation": 1,
    "precision": "fp32",
    "profiles": [
     {
      "stage": 0,
      "shapes": [
       [
        "latent",
        [
         1,
         4,
         16,
         16
        ],
        [
         1,
         4,
         16,
         16
        ],
        [
         1,
         4,
         16,
         16
        ]
       ]
      ]
     },
     {
      "stage": 1,
      "shapes": [
       [
        "latent",
        [
         1,
         4,
         32,
         32
        ],
        [
         1,
         4,
         32,
         32
        ],
        [
         1,
         4,
         32,
         32
        ]
       ]
      ]
     }
    ],
    "backend": "torch",
    "backend_version": "2.13.0+cpu",
    "device": "cpu"
   },
   "created": 1796124660.4007978,
   "files": []
  },
  {
   "digest": "1af9d9acac15c23c1f2463f1e72ea6d9864b95282a0787d3368aca23c7f6e4ef",
   "key": {
    "model": "tiny-sd15",
    "weights": "a986330689556ef3763e4cd85b06775321cb4112d9eb3c06e1fc56092e795b9f",
    "network": "unet",
    "variant": "standard",
    "dilation": 1,
    "precision": "fp32",
    "profiles": [
     {
      "stage": 0,
      "shapes": [
       [
        "sample",
        [
         1,
         4,
         16,
         16
        ],
        [
         2,
         4,
         16,
         16
        ],
        [
         2,
         4,
         16,
         16
        ]
       ],
       [
        "timestep",
        [
         1
        ],
        [
         1
        ],
        [
         1
        ]
       ],
       [
        "encoder_hidden_states",
        [
         1,
         77,
         32
        ],
        [
         2,
         77,
         32
        ],
        [
         2,
         77,
         32
        ]
       ]
      ]
     }
    ],
    "backend": "torch",
    "backend_version": "2.13.0+cpu",
    "device": "cpu"
   },
   "created": 1796124660.1945977,
   "files": []
  },
  {
   "digest": "322335216a061d57b9188a1c9f9af6b7ebeb64cfd152f83ffe0e88933cec31de",
   "key": {
    "model": "tiny-sd15",
    "weights": "c640ac4aa037338e4df99b97646d6fb2caafb5118be39a044a135dfcae796c64",
    "network": "vae_encoder",
    "variant": "standard",
    "dilation": 1,
    "precision": "fp32",
    "profiles": [
     {
      "stage": 1,
      "shapes": [
       [
        "image",
        [
         1,
         3,
         256,
         256
        ],
        [
         1,
         3,
         256,
         256
        ],
        [
         1,
         3,
         256,
         256
        ]
       ]
      ]
     }
    ],
    "backend": "torch",
    "backend_version": "2.13.0+cpu",
    "device": "cpu"
   },
   "created": 1796124660.4031878,
   "files": []
  },
  {
   "digest": "387a6bce303ac56968bcd8869b4d069e0751d62aca04b52b2205d0e841b4df94",
   "key": {
    "model": "tiny-sd15",
    "weights": "16127aac9146a588409a4ccb363aa24611ae88a80d9e85d366ffada95ccc870c",
    "network": "text_encoder",
    "variant": "standard",
    "dilation": 1,
    "precision": "fp32",
    "profiles": [
     {
      "stage": 0,
      "shapes": [
       [
        "input_ids",
        [
         1,
         77
        ],
        [
         1,
         77
        ],
        [
         2,
         77
        ]
       ]
      ]
     }
    ],
    "backend": "torch",
    "backend_version": "2.13.0+cpu",
    "device": "cpu"
   },
   "created": 1796124659.9909928,
   "files": []
  },
  {
   "digest": "ada0c7f824a3beed954fde49883cfbb7a961e8d10e7a8e8a0eb8febb680ce863",
   "key": {
    "model": "tiny-sd15",
    "weights": "a986330689556ef3763e4cd85b06775321cb4112d9eb3c06e1fc56092e795b9f",
    "network": "unet",
    "variant": "dilated",
    "dilation": 2,
    "precision": "fp32",
    "profiles": [
     {
      "stage": 1,
      "shapes": [
       [
        "sample",
        [
         1,
         4,
         32,
         32
        ],
        [
         2,
         4,
         32,
         32
        ],
        [
         2,
         4,
         32,
         32
        ]
       ],
       [
        "timestep",
        [
         1
        ],
        [
         1
        ],
        [
         1
        ]
       ],
       [
        "encoder_hidden_states",
        [
         1,
         77,
         32
        ],
        [
         2,
         77,
         32
        ],
        [
         2,
         77,
         32
        ]
       ]
      ]
     }
    ],
    "backend": "torch",
    "backend_version": "2.13.0+cpu",
    "device": "cpu"
   },
   "created": 1796124660.197037,
   "files": []
  }
 ]
})MF";

constexpr const char* kPythonModels = R"MF(
{
 "format": 1,
 "models": {
  "tiny-sd15": {
   "vae_scaling_factor": 0.18215,
   "vocab_sizes": [
    514
   ],
   "weights": {
    "text_encoder": "16127aac9146a588409a4ccb363aa24611ae88a80d9e85d366ffada95ccc870c",
    "unet": "a986330689556ef3763e4cd85b06775321cb4112d9eb3c06e1fc56092e795b9f",
    "vae_decoder": "c640ac4aa037338e4df99b97646d6fb2caafb5118be39a044a135dfcae796c64",
    "vae_encoder": "c640ac4aa037338e4df99b97646d6fb2caafb5118be39a044a135dfcae796c64"
   },
   "source": "random:0"
  }
 }
})MF";

#endif  // MEGAFUSION_TESTS_PYTHON_MANIFEST_HPP_
