"""The Chinese words of `scale demo-data --language zh`: one hand-written Chinese word per English
word of the demo (`datamodules/demo.py`), so a Chinese demo is the English one with its words
replaced, product for product.

Why word for word, not separate Chinese lists: the demo draws every word with the RNG from a list
of a fixed length, so lists of the same lengths give the same draws. The same seeds then give the
same categories, instances, confusions and media (byte for byte), and the planted signal keeps its
structure (six category words -> category, five property keys per category) in either language.

Titles and tables of M5Product are Chinese with Latin brands, model codes and units mixed in
("2024新款 Kalomi 连衣裙 包邮"); the demo keeps its brands, model codes and units (65W, 500ml, XL)
Latin. Category words of categories past the noun list are made of syllables (`demo._word`); each
Latin syllable becomes one Chinese character of `SYLLABLES`, characters that occur in no other word
here, so those made-up words share no token with a listed word (as the Latin ones share none).
"""

from __future__ import annotations

NOUNS: dict[str, str] = dict(line.split() for line in """\
shoe 鞋子
sneaker 运动鞋
boot 靴子
dress 连衣裙
skirt 半身裙
shirt 衬衫
jacket 夹克
hoodie 卫衣
phone 手机
charger 充电器
cable 数据线
earbuds 蓝牙耳机
speaker 音箱
lamp 台灯
bulb 灯泡
mug 马克杯
kettle 电水壶
teapot 茶壶
pan 平底锅
knife 菜刀
spoon 汤勺
blender 榨汁机
pillow 枕头
blanket 毛毯
towel 毛巾
curtain 窗帘
rug 地毯
chair 椅子
desk 书桌
shelf 置物架
backpack 双肩包
wallet 钱包
handbag 手提包
watch 手表
bracelet 手链
necklace 项链
lipstick 口红
serum 精华液
shampoo 洗发水
perfume 香水
toy 玩具
puzzle 拼图
doll 玩偶
drone 无人机
camera 相机
tripod 三脚架
bicycle 自行车
helmet 头盔
tent 帐篷
glove 手套
sock 袜子
scarf 围巾""".splitlines())
"""English category noun -> Chinese product noun (the demo's `_NOUNS`)."""

FILLERS: dict[str, str] = {
    "new": "新款", "hot": "爆款", "sale": "特价", "2024": "2024", "free shipping": "包邮",
    "official": "官方旗舰店", "genuine": "正品", "best": "优选", "quality": "品质保证", "discount": "折扣",
    "original": "原装", "limited": "限量", "gift": "送礼", "promo": "促销", "fast delivery": "现货速发",
    "cheap": "实惠",
}  # fmt: skip
"""English generic title word -> the Chinese one (the demo's `_FILLERS`)."""

KEYS: dict[str, str] = {
    "material": "材质", "style": "风格", "season": "季节", "fit": "版型", "power": "功率", "capacity": "容量",
    "pattern": "图案", "origin": "产地", "age group": "适用年龄", "usage": "适用场景", "weight": "重量",
    "finish": "表面工艺", "size": "尺码", "feature": "功能",
}  # fmt: skip
"""English property key -> the Chinese key (the demo's `_KEYS`)."""

VALUES: dict[str, str] = {
    "cotton": "棉", "leather": "真皮", "plastic": "塑料", "steel": "不锈钢", "wood": "实木", "glass": "玻璃",
    "silicone": "硅胶", "ceramic": "陶瓷",
    "casual": "休闲", "classic": "经典", "sporty": "运动风", "vintage": "复古", "minimal": "简约", "luxury": "轻奢",
    "spring": "春季", "summer": "夏季", "autumn": "秋季", "winter": "冬季", "all-season": "四季通用",
    "slim": "修身", "regular": "常规", "loose": "宽松", "oversized": "廓形",
    "battery": "电池供电",
    "solid": "纯色", "striped": "条纹", "floral": "碎花", "plaid": "格子", "dotted": "波点",
    "Zhejiang": "浙江", "Guangdong": "广东", "Jiangsu": "江苏", "Fujian": "福建", "Shandong": "山东",
    "adult": "成人", "teen": "青少年", "kids": "儿童", "baby": "婴儿",
    "home": "家用", "office": "办公", "outdoor": "户外", "travel": "旅行", "gym": "健身",
    "matte": "磨砂", "glossy": "亮面", "brushed": "拉丝", "textured": "纹理",
    "one-size": "均码",
    "waterproof": "防水", "wireless": "无线", "foldable": "可折叠", "portable": "便携", "rechargeable": "可充电",
}  # fmt: skip
"""English property value -> the Chinese value; a value not here (5W, 500ml, 1kg, XL) stays as it is."""

BRAND_KEY, MODEL_KEY = "品牌", "型号"
"""The table keys of the instance's brand and model code (English: brand, model)."""

SYLLABLES: dict[str, str] = dict(zip(
    "ka lo mi ra ven zu tor qui sa ne dor fi ga ble xo pe lin mar co ty bro nix sol ume vak dri".split(),
    "卡洛米娜文祖托奇萨妮朵菲嘉贝索佩琳玛科蒂博尼露梅瓦德"))  # fmt: skip
"""Latin syllable of the demo's made-up words -> one Chinese character."""
